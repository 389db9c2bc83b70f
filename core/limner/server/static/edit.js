// limner playground, the Edit panel: an image dropped or chosen, a mask painted over it (or
// uploaded), and the edit forming step by step, through POST /v1/images/edits.
//
// The request is the multipart form OpenAI's images.edit sends: the image file as it was
// chosen, the mask as a PNG of the image's size whose fully transparent pixels mark what to
// repaint, and the fields; stream_format "limner" streams a preview at every step.
"use strict";

(() => {
  const { api, followStream, showError, refreshPool } = window.limnerPlayground;
  const $ = (id) => document.getElementById(id);

  const section = $("edit");
  const sourceCanvas = $("edit-source");
  const maskCanvas = $("edit-mask");
  const result = $("edit-image");
  const progress = $("edit-progress");
  const status = $("edit-status");
  const download = $("edit-download");
  const PAINT = "rgba(255, 40, 40, 1)"; // shown at the canvas's opacity over the image

  let source = null; // {file, width, height}
  let painted = false;
  let running = null; // the AbortController of the edit in progress
  let formsEnabled = false;
  let resultURL = null;
  let lastStep = null;

  function syncButtons() {
    $("edit-button").disabled = !formsEnabled || running !== null || !source;
    $("edit-stop").disabled = running === null;
    $("clear-mask").disabled = !formsEnabled || !painted;
  }

  document.addEventListener("limner:forms", (event) => {
    formsEnabled = event.detail.enabled;
    syncButtons();
  });

  function setState(state, message) {
    section.dataset.state = state;
    status.textContent = message;
    if (state !== "running") $("edit-step").textContent = "";
  }

  function showMaskState() {
    $("mask-state").textContent = painted
      ? "Only the painted area changes."
      : "No mask: all of it changes.";
    section.dataset.masked = painted ? "yes" : "no";
    syncButtons();
  }

  // -- the image and its mask ---------------------------------------------------------------

  function loadImage(url) {
    return new Promise((resolve, reject) => {
      const image = new Image();
      image.onload = () => resolve(image);
      image.onerror = () => reject(new Error("the browser cannot read that file as an image"));
      image.src = url;
    });
  }

  async function chooseImage(file) {
    if (!file || !file.type.startsWith("image/")) {
      showError($("edit-error"), new Error("That file is not an image."));
      return;
    }
    $("edit-error").hidden = true;
    const url = URL.createObjectURL(file);
    try {
      const image = await loadImage(url);
      source = { file, width: image.naturalWidth, height: image.naturalHeight };
      for (const canvas of [sourceCanvas, maskCanvas]) {
        canvas.width = source.width;
        canvas.height = source.height;
        canvas.hidden = false;
      }
      sourceCanvas.getContext("2d").drawImage(image, 0, 0);
      maskCanvas.getContext("2d").clearRect(0, 0, source.width, source.height);
      $("edit-source-frame").style.aspectRatio = `${source.width} / ${source.height}`;
      $("edit-source-empty").hidden = true;
      painted = false;
      showMaskState();
      setState("idle", `${file.name}: ${source.width}x${source.height}. Paint where it should change.`);
    } catch (error) {
      showError($("edit-error"), error);
    } finally {
      URL.revokeObjectURL(url);
    }
  }

  // Painting: pointer positions in the canvas's own pixels, whatever its size on screen.
  let stroke = null;

  function canvasPoint(event) {
    const box = maskCanvas.getBoundingClientRect();
    return {
      x: ((event.clientX - box.left) * maskCanvas.width) / box.width,
      y: ((event.clientY - box.top) * maskCanvas.height) / box.height,
      scale: maskCanvas.width / box.width,
    };
  }

  function paintTo(point) {
    const context = maskCanvas.getContext("2d");
    context.strokeStyle = PAINT;
    context.fillStyle = PAINT;
    context.lineCap = "round";
    context.lineJoin = "round";
    context.lineWidth = Number($("brush").value) * point.scale;
    context.beginPath();
    if (stroke) {
      context.moveTo(stroke.x, stroke.y);
      context.lineTo(point.x, point.y);
      context.stroke();
    } else {
      context.arc(point.x, point.y, context.lineWidth / 2, 0, 2 * Math.PI);
      context.fill();
    }
    stroke = point;
    if (!painted) {
      painted = true;
      showMaskState();
    }
  }

  maskCanvas.addEventListener("pointerdown", (event) => {
    if (!source || running) return;
    maskCanvas.setPointerCapture(event.pointerId);
    stroke = null;
    paintTo(canvasPoint(event));
  });
  maskCanvas.addEventListener("pointermove", (event) => {
    if (stroke) paintTo(canvasPoint(event));
  });
  for (const name of ["pointerup", "pointercancel"]) {
    maskCanvas.addEventListener(name, () => {
      stroke = null;
    });
  }

  function clearMask() {
    maskCanvas.getContext("2d").clearRect(0, 0, maskCanvas.width, maskCanvas.height);
    painted = false;
    showMaskState();
  }

  // An uploaded mask becomes paint: where it is transparent (OpenAI's masks) or, in a mask
  // without transparency, white.
  async function uploadMask(file) {
    $("edit-error").hidden = true;
    if (!source) {
      showError($("edit-error"), new Error("Choose the image first, then its mask."));
      return;
    }
    const url = URL.createObjectURL(file);
    try {
      const image = await loadImage(url);
      if (image.naturalWidth !== source.width || image.naturalHeight !== source.height) {
        throw new Error(
          `The mask is ${image.naturalWidth}x${image.naturalHeight} and the image ` +
            `${source.width}x${source.height}; they must be the same size.`,
        );
      }
      const reader = document.createElement("canvas");
      reader.width = source.width;
      reader.height = source.height;
      const context = reader.getContext("2d");
      context.drawImage(image, 0, 0);
      const pixels = context.getImageData(0, 0, source.width, source.height).data;
      let transparent = false;
      for (let i = 3; i < pixels.length; i += 4) {
        if (pixels[i] < 255) {
          transparent = true;
          break;
        }
      }
      const paint = maskCanvas.getContext("2d").createImageData(source.width, source.height);
      let any = false;
      for (let i = 0; i < pixels.length; i += 4) {
        const bright = (pixels[i] * 299 + pixels[i + 1] * 587 + pixels[i + 2] * 114) / 1000;
        const repaint = transparent ? pixels[i + 3] === 0 : bright >= 128;
        if (repaint) {
          paint.data.set([255, 40, 40, 255], i);
          any = true;
        }
      }
      maskCanvas.getContext("2d").putImageData(paint, 0, 0);
      painted = any;
      showMaskState();
    } catch (error) {
      showError($("edit-error"), error);
    } finally {
      URL.revokeObjectURL(url);
    }
  }

  // The painted area as OpenAI's mask: fully transparent where painted, opaque elsewhere.
  function maskBlob() {
    const { width, height } = maskCanvas;
    const paint = maskCanvas.getContext("2d").getImageData(0, 0, width, height).data;
    const out = document.createElement("canvas");
    out.width = width;
    out.height = height;
    const context = out.getContext("2d");
    const mask = context.createImageData(width, height);
    for (let i = 0; i < paint.length; i += 4) {
      mask.data[i + 3] = paint[i + 3] > 0 ? 0 : 255; // RGB stays black
    }
    context.putImageData(mask, 0, 0);
    return new Promise((resolve) => out.toBlob(resolve, "image/png"));
  }

  // -- the request and its stream -----------------------------------------------------------

  function showResult(src, { preview, alt }) {
    result.src = src;
    result.alt = alt;
    result.classList.toggle("preview", preview);
    result.hidden = false;
    $("edit-empty").hidden = true;
  }

  async function editRequest() {
    const form = new FormData();
    form.append("image", source.file, source.file.name || "image.png");
    if (painted) form.append("mask", await maskBlob(), "mask.png");
    form.append("model", $("edit-model").value);
    form.append("prompt", $("edit-prompt").value);
    form.append("strength", $("strength").value || "0.6");
    for (const [id, name] of [["edit-steps", "steps"], ["edit-seed", "seed"]]) {
      const value = $(id).value.trim();
      if (value !== "") form.append(name, value);
    }
    form.append("stream", "true");
    form.append("stream_format", "limner");
    form.append("preview", "true");
    return form;
  }

  async function edit(event) {
    event.preventDefault();
    if (running || !source) return;
    $("edit-error").hidden = true;
    download.hidden = true;
    progress.value = 0;
    progress.max = 1;
    lastStep = null;
    running = new AbortController();
    syncButtons();
    const model = $("edit-model").value;
    setState("running", `Editing with ${model}…`);
    $("edit-frame").style.aspectRatio = `${source.width} / ${source.height}`;
    try {
      const body = await editRequest();
      const response = await api("/v1/images/edits", { body, signal: running.signal });
      await followStream(response, { progress: showStep, completed: showEdited });
      if (section.dataset.state === "running") {
        throw new Error("the stream ended before the image arrived");
      }
    } catch (error) {
      if (error.name === "AbortError") {
        setState(
          "stopped",
          lastStep
            ? `Stopped at step ${lastStep.step} of ${lastStep.total}.`
            : "Stopped before the first step.",
        );
      } else {
        setState("failed", "Failed.");
        showError($("edit-error"), error);
      }
    } finally {
      running = null;
      syncButtons();
      refreshPool();
    }
  }

  function showStep(step) {
    lastStep = step;
    progress.max = step.total;
    progress.value = step.step;
    $("edit-step").textContent = `Step ${step.step} of ${step.total}, ${step.elapsed.toFixed(1)} s`;
    if (step.preview) {
      showResult(`data:image/png;base64,${step.preview}`, {
        preview: true,
        alt: `Preview after step ${step.step} of ${step.total}`,
      });
    }
  }

  function showEdited(answer) {
    const bytes = Uint8Array.from(atob(answer.data[0].b64_json), (c) => c.charCodeAt(0));
    if (resultURL) URL.revokeObjectURL(resultURL);
    resultURL = URL.createObjectURL(new Blob([bytes], { type: "image/png" }));
    showResult(resultURL, { preview: false, alt: `Edited by ${answer.model}` });
    download.href = resultURL;
    download.download = `limner-edit-${answer.seed}.png`;
    download.hidden = false;
    progress.value = progress.max;
    const seconds = lastStep ? `, ${lastStep.elapsed.toFixed(1)} s` : "";
    setState("done", `Done: ${answer.size}, seed ${answer.seed}${seconds}.`);
  }

  $("edit-form").addEventListener("submit", edit);
  $("edit-stop").addEventListener("click", () => running && running.abort());
  $("clear-mask").addEventListener("click", clearMask);
  $("edit-file").addEventListener("change", (event) => {
    chooseImage(event.target.files[0]);
    event.target.value = ""; // choosing the same file again loads it again
  });
  $("mask-file").addEventListener("change", (event) => {
    if (event.target.files[0]) uploadMask(event.target.files[0]);
    event.target.value = "";
  });
  const drop = $("edit-drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    chooseImage(event.dataTransfer.files[0]);
  });

  showMaskState();
})();
