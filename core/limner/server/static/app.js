// limner playground: the public HTTP API, called from this page and nothing else.
//
// fetch() rather than EventSource for the generation stream: EventSource cannot send the
// Authorization header, and an AbortController lets Stop close the connection, which makes
// the server stop the generation at its next step.
"use strict";

(() => {
  const KEY_STORAGE = "limner.apiKey";
  const POOL_EVERY_MS = 2000;
  const EMBED_BATCH = 16; // images per /v1/embeddings call: small bodies, steady progress

  const $ = (id) => document.getElementById(id);

  // -- the API ---------------------------------------------------------------------------------

  class APIError extends Error {
    constructor(status, message, code, param) {
      super(message);
      this.name = "APIError";
      this.status = status;
      this.code = code;
      this.param = param;
    }
  }

  function storedKey() {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  }

  async function api(path, { body, signal } = {}) {
    const headers = {};
    const key = storedKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    const init = { method: "GET", headers, signal };
    if (body !== undefined) {
      init.method = "POST";
      if (body instanceof FormData) {
        init.body = body; // multipart/form-data: the browser writes the type and boundary
      } else {
        headers["Content-Type"] = "application/json";
        init.body = JSON.stringify(body);
      }
    }
    const response = await fetch(path, init);
    if (!response.ok) {
      const error = await errorOf(response);
      if (error.status === 401) needKey(error);
      throw error;
    }
    return response;
  }

  async function errorOf(response) {
    let detail = {};
    try {
      detail = (await response.json()).error || {};
    } catch {
      // not the API's error shape (a proxy's page): the status says enough
    }
    const message = detail.message || `${response.status} ${response.statusText}`;
    return new APIError(response.status, message, detail.code, detail.param);
  }

  // Server-sent events from a fetch body, as {name, data} objects.
  async function* serverSentEvents(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let name = "message";
    let data = [];
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer += decoder.decode(value, { stream: true });
        const lines = buffer.split(/\r\n|\r|\n/);
        buffer = lines.pop(); // an unfinished line waits for the next chunk
        for (const line of lines) {
          if (line === "") {
            if (data.length) yield { name, data: data.join("\n") };
            name = "message";
            data = [];
          } else if (line.startsWith("event:")) {
            name = line.slice(6).trim();
          } else if (line.startsWith("data:")) {
            data.push(line.slice(5).replace(/^ /, ""));
          }
        }
      }
    } finally {
      reader.releaseLock();
    }
  }

  // limner's stream (stream_format "limner"): each progress and completed event to its
  // handler; an error event is thrown as the APIError it carries.
  async function followStream(response, { progress, completed }) {
    for await (const message of serverSentEvents(response.body)) {
      if (message.name === "progress") {
        progress(JSON.parse(message.data));
      } else if (message.name === "completed") {
        completed(JSON.parse(message.data));
      } else if (message.name === "error") {
        const failure = JSON.parse(message.data);
        const detail = failure.error || {};
        throw new APIError(failure.status, detail.message, detail.code, detail.param);
      }
    }
  }

  // -- the key and the connection -------------------------------------------------------------

  const connection = $("connection");
  let pollTimer = null;

  function needKey(error) {
    stopPolling();
    document.body.dataset.connection = "unauthorized";
    const refused = Boolean(storedKey());
    connection.textContent = refused
      ? `The server refused this API key (${error.message}). Enter the right key above.`
      : "This server needs an API key: enter it above, then choose Use key.";
    connection.hidden = false;
    showKeyState(refused ? "refused" : "none");
    setFormsEnabled(false);
    $("api-key").focus();
  }

  // What the key beside the form is: none, being tried, taken by the server, or refused.
  const KEY_STATES = {
    none: "Kept in this tab.",
    trying: "Trying the key…",
    accepted: "Key set for this tab.",
    refused: "Key refused: not this server's.",
  };

  function showKeyState(state) {
    $("forget-key").hidden = !storedKey();
    $("key-state").textContent = KEY_STATES[storedKey() ? state : "none"];
    $("key-state").dataset.state = storedKey() ? state : "none";
  }

  function setFormsEnabled(enabled) {
    for (const form of document.querySelectorAll("form.fields")) {
      for (const control of form.elements) {
        if (!("stop" in control.dataset)) control.disabled = !enabled;
      }
    }
    if (enabled) syncGenerateButtons();
    // edit.js keeps its own buttons in step
    document.dispatchEvent(new CustomEvent("limner:forms", { detail: { enabled } }));
  }

  async function connect() {
    showKeyState("trying");
    let models;
    try {
      models = (await (await api("/v1/models")).json()).data;
    } catch (error) {
      if (!(error instanceof APIError && error.status === 401)) {
        document.body.dataset.connection = "failed";
        connection.textContent = `Cannot reach the server's API: ${error.message}`;
        connection.hidden = false;
      }
      return;
    }
    connection.hidden = true;
    document.body.dataset.connection = "ok";
    showKeyState("accepted");
    generators = new Map(models.map((model) => [model.id, model]));
    fillModels($("gen-model"), models, "text-to-image", "No text-to-image model is served.");
    fillModels($("edit-model"), models, "text-to-image", "No text-to-image model is served.");
    fillModels($("search-model"), models, "image-embedding", "No embedding model is served.");
    applyLimits();
    setFormsEnabled(true);
    await refreshLoras();
    $("search-button").disabled = !$("search-model").value;
    startPolling();
  }

  function fillModels(select, models, capability, none) {
    const previous = select.value;
    select.replaceChildren();
    const served = models.filter((model) => model.capability === capability);
    for (const model of served) {
      const label = model.tiny ? `${model.id} (tiny, random weights)` : model.id;
      select.append(new Option(label, model.id, false, model.id === previous));
    }
    if (!served.length) select.append(new Option(none, ""));
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    $("api-key").value = "";
    connect();
  });

  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    connect();
  });

  // -- the pool ---------------------------------------------------------------------------------

  function startPolling() {
    stopPolling();
    refreshPool();
    pollTimer = setInterval(() => {
      if (!document.hidden) refreshPool();
    }, POOL_EVERY_MS);
  }

  function stopPolling() {
    clearInterval(pollTimer);
    pollTimer = null;
  }

  let poolBusy = false;

  async function refreshPool() {
    if (poolBusy) return;
    poolBusy = true;
    try {
      showPool(await (await api("/v1/pool")).json());
    } catch (error) {
      $("pool-summary").textContent = `Could not read the pool: ${error.message}`;
    } finally {
      poolBusy = false;
    }
  }

  function showPool(pool) {
    const loaded = pool.models.filter((model) => model.state === "ready").length;
    const memory = pool.models.reduce((sum, model) => sum + model.memory_mb, 0);
    const waiting = pool.models.reduce((sum, model) => sum + model.queue_depth, 0);
    $("pool-summary").textContent = pool.models.length
      ? `${loaded} loaded, ${formatMB(memory)} in use, ${waiting} waiting` +
        (pool.ready ? "." : "; preloads still loading.")
      : "No model used yet: a model loads on its first request.";
    const rows = pool.models.map((model) => {
      const row = document.createElement("tr");
      row.dataset.key = model.key;
      const cells = [
        [model.key],
        [model.state],
        [String(model.queue_depth), "number"],
        [String(model.in_flight), "number"],
        [formatMB(model.memory_mb), "number"],
        [model.device || "–", "device"],
      ];
      for (const [text, className] of cells) {
        const cell = document.createElement("td");
        cell.textContent = text;
        if (className) cell.className = className;
        row.append(cell);
      }
      return row;
    });
    $("pool-table").tBodies[0].replaceChildren(...rows);
    $("pool-rows").hidden = !rows.length;
  }

  function formatMB(megabytes) {
    return megabytes >= 1024 ? `${(megabytes / 1024).toFixed(1)} GB` : `${Math.round(megabytes)} MB`;
  }

  // -- generate -------------------------------------------------------------------------------

  const generateSection = $("generate");
  const image = $("gen-image");
  const progress = $("gen-progress");
  const status = $("gen-status");
  const download = $("download");
  let running = null; // the AbortController of the generation in progress
  let resultURL = null;
  let lastStep = null;

  function syncGenerateButtons() {
    $("generate-button").disabled = running !== null || !$("gen-model").value;
    $("stop-button").disabled = running === null;
  }

  function setGenerateState(state, message) {
    generateSection.dataset.state = state;
    status.textContent = message;
    if (state !== "running") $("gen-step").textContent = "";
  }

  function integerField(id) {
    const text = $(id).value.trim();
    return text === "" ? undefined : Number(text);
  }

  // The form's fields and the request field whose limits each takes, from /v1/models.
  const LIMITED_FIELDS = [
    ["width", "width", "Width"],
    ["height", "height", "Height"],
    ["steps", "steps", "Steps"],
  ];
  let generators = new Map(); // model id -> its /v1/models card

  function currentLimits() {
    const model = generators.get($("gen-model").value);
    return (model && model.limits) || null;
  }

  // The model's bounds on the fields, so the form offers only what the server takes.
  function applyLimits() {
    const limits = currentLimits();
    for (const [id, name] of LIMITED_FIELDS) {
      const input = $(id);
      const field = limits ? limits[name] : null;
      const set = (attribute, value) =>
        value === null || value === undefined
          ? input.removeAttribute(attribute)
          : input.setAttribute(attribute, String(value));
      set("min", field && field.min);
      set("max", field && field.max);
      set("step", field && field.multiple);
      input.placeholder =
        field && field.default !== null ? `default ${field.default}` : "default";
    }
  }

  // What is wrong with a field for this model, in words, or null.
  function fieldProblem(id, label) {
    const input = $(id);
    const { validity } = input;
    if (validity.valid) return null;
    const model = $("gen-model").value;
    if (validity.badInput) return `${label} must be a whole number.`;
    if (validity.rangeUnderflow || validity.rangeOverflow) {
      const low = input.getAttribute("min");
      const high = input.getAttribute("max");
      return `${label} must be between ${low} and ${high} for ${model}; it is ${input.value}.`;
    }
    if (validity.stepMismatch) {
      const step = input.getAttribute("step");
      return `${label} must be a multiple of ${step} for ${model}; it is ${input.value}.`;
    }
    if (validity.valueMissing) return `${label} is required.`;
    return `${label}: ${input.validationMessage}`;
  }

  // The first bad field, named beside the button; true when every field is good.
  function checkFields() {
    const fields = [["prompt", "The prompt"], ...LIMITED_FIELDS.map(([id, , l]) => [id, l])];
    fields.push(["seed", "The seed"]);
    for (const [id, label] of fields) {
      const problem = fieldProblem(id, label);
      if (problem) {
        showError($("gen-error"), new Error(problem));
        $(id).focus();
        return false;
      }
    }
    return true;
  }

  function generationRequest() {
    const body = {
      model: $("gen-model").value,
      prompt: $("prompt").value,
      stream: true,
      stream_format: "limner", // a progress event per step, with its preview
      preview: true,
    };
    const width = integerField("width");
    const height = integerField("height");
    if (width !== undefined || height !== undefined) {
      body.size = `${width ?? height}x${height ?? width}`; // one side given: a square
    }
    const steps = integerField("steps");
    if (steps !== undefined) body.steps = steps;
    const seed = integerField("seed");
    if (seed !== undefined) body.seed = seed;
    const loras = chosenLoras();
    if (loras.length) body.loras = loras;
    return body;
  }

  function showImage(src, { preview, alt }) {
    image.src = src;
    image.alt = alt;
    image.classList.toggle("preview", preview);
    image.hidden = false;
    $("gen-empty").hidden = true;
  }

  function frameShape(width, height) {
    $("gen-frame").style.aspectRatio = width && height ? `${width} / ${height}` : "";
  }

  async function generate(event) {
    event.preventDefault();
    if (running) return;
    $("gen-error").hidden = true;
    if (!checkFields()) return;
    const body = generationRequest();
    download.hidden = true;
    progress.value = 0;
    progress.max = 1;
    lastStep = null;
    running = new AbortController();
    syncGenerateButtons();
    setGenerateState("running", `Generating with ${body.model}…`);
    const size = body.size ? body.size.split("x").map(Number) : [];
    frameShape(size[0], size[1]);
    try {
      const response = await api("/v1/images/generations", { body, signal: running.signal });
      await followStream(response, {
        progress: showStep,
        completed: (answer) => showResult(answer, body.prompt),
      });
      if (generateSection.dataset.state === "running") {
        throw new Error("the stream ended before the image arrived");
      }
    } catch (error) {
      if (error.name === "AbortError") {
        setGenerateState(
          "stopped",
          lastStep
            ? `Stopped at step ${lastStep.step} of ${lastStep.total}.`
            : "Stopped before the first step.",
        );
      } else {
        setGenerateState("failed", "Failed.");
        showError($("gen-error"), error);
      }
    } finally {
      running = null;
      syncGenerateButtons();
      refreshPool();
    }
  }

  function showStep(step) {
    lastStep = step;
    progress.max = step.total;
    progress.value = step.step;
    $("gen-step").textContent = `Step ${step.step} of ${step.total}, ${step.elapsed.toFixed(1)} s`;
    if (step.preview) {
      showImage(`data:image/png;base64,${step.preview}`, {
        preview: true,
        alt: `Preview after step ${step.step} of ${step.total}`,
      });
    }
  }

  function showResult(result, prompt) {
    const [width, height] = result.size.split("x").map(Number);
    frameShape(width, height);
    const bytes = Uint8Array.from(atob(result.data[0].b64_json), (c) => c.charCodeAt(0));
    if (resultURL) URL.revokeObjectURL(resultURL);
    resultURL = URL.createObjectURL(new Blob([bytes], { type: "image/png" }));
    showImage(resultURL, { preview: false, alt: `Generated by ${result.model}: ${prompt}` });
    download.href = resultURL;
    download.download = `limner-${result.seed}.png`;
    download.hidden = false;
    progress.value = progress.max;
    const seconds = lastStep ? `, ${lastStep.elapsed.toFixed(1)} s` : "";
    setGenerateState("done", `Done: ${result.size}, seed ${result.seed}${seconds}.`);
  }

  function stop() {
    if (running) running.abort();
  }

  // -- LoRA adapters of the chosen model ----------------------------------------------------

  let adapters = []; // GET /v1/loras: the adapters the server can load

  async function refreshLoras() {
    try {
      adapters = (await (await api("/v1/loras")).json()).data;
    } catch {
      adapters = []; // a server without adapters, or one that lists none
    }
    showLoras();
  }

  // A tick and a scale for each adapter that fits the chosen model; ticks and scales
  // already set are kept when the list is drawn again.
  function showLoras() {
    const model = $("gen-model").value;
    const kept = new Map(chosenLoras().map((lora) => [lora.name, lora.scale]));
    const rows = adapters
      .filter((adapter) => adapter.models.includes(model))
      .map((adapter) => {
        const row = document.createElement("li");
        row.dataset.name = adapter.name;
        const tick = document.createElement("input");
        tick.type = "checkbox";
        tick.id = `lora-${adapter.name}`;
        tick.checked = kept.has(adapter.name);
        const label = document.createElement("label");
        label.htmlFor = tick.id;
        label.textContent = `${adapter.name} (rank ${adapter.rank})`;
        const scale = document.createElement("input");
        scale.type = "number";
        scale.step = "0.05";
        scale.min = "-4";
        scale.max = "4";
        scale.value = String(kept.get(adapter.name) ?? 1);
        scale.setAttribute("aria-label", `Scale of ${adapter.name}`);
        row.append(tick, label, scale);
        return row;
      });
    $("lora-list").replaceChildren(...rows);
    $("loras").hidden = !rows.length;
  }

  function chosenLoras() {
    return [...$("lora-list").children]
      .filter((row) => row.querySelector('input[type="checkbox"]').checked)
      .map((row) => ({
        name: row.dataset.name,
        scale: Number(row.querySelector('input[type="number"]').value || 1),
      }));
  }

  $("generate-form").addEventListener("submit", generate);
  $("stop-button").addEventListener("click", stop);
  $("gen-model").addEventListener("change", () => {
    applyLimits();
    syncGenerateButtons();
    showLoras();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && running) stop();
  });

  // -- search ---------------------------------------------------------------------------------

  const results = $("results");
  const searchStatus = $("search-status");
  let pictures = []; // {name, dataURL, url, vector, score, item}, in the order shown
  let lastQuery = null;

  function readAsDataURL(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  function pictureItem(picture) {
    const item = document.createElement("li");
    item.dataset.name = picture.name;
    const rank = document.createElement("span");
    rank.className = "rank";
    const thumbnail = document.createElement("img");
    thumbnail.src = picture.url;
    thumbnail.alt = picture.name;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = picture.name;
    name.title = picture.name;
    const score = document.createElement("span");
    score.className = "score";
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Remove ${picture.name}`);
    remove.addEventListener("click", () => removePicture(picture));
    item.append(rank, thumbnail, name, score, remove);
    return item;
  }

  function showPictures() {
    results.replaceChildren(...pictures.map((picture) => picture.item));
    pictures.forEach((picture, index) => {
      const ranked = picture.score !== null;
      picture.item.querySelector(".rank").textContent = ranked ? `#${index + 1}` : "";
      picture.item.querySelector(".score").textContent = ranked
        ? `score ${picture.score.toFixed(3)}`
        : picture.vector
          ? "embedded"
          : "embedding…";
      picture.item.dataset.score = ranked ? String(picture.score) : "";
    });
  }

  function removePicture(picture) {
    pictures = pictures.filter((other) => other !== picture);
    URL.revokeObjectURL(picture.url);
    showPictures();
    searchStatus.textContent = `Removed ${picture.name}; ${pictures.length} images left.`;
  }

  async function addFiles(files) {
    const images = [...files].filter((file) => file.type.startsWith("image/"));
    $("search-error").hidden = true;
    if (!images.length) {
      searchStatus.textContent = "None of those files is an image.";
      return;
    }
    const added = await Promise.all(
      images.map(async (file) => ({
        name: file.name,
        dataURL: await readAsDataURL(file),
        url: URL.createObjectURL(file),
        vector: null,
        score: null,
      })),
    );
    for (const picture of added) picture.item = pictureItem(picture);
    pictures.push(...added);
    for (const picture of pictures) picture.score = null; // the ranking no longer covers all
    showPictures();
    await embedPictures(added);
  }

  async function embedPictures(batch) {
    const model = $("search-model").value;
    searchStatus.textContent = `Embedding ${batch.length} images with ${model}…`;
    const failures = [];
    try {
      for (let start = 0; start < batch.length; start += EMBED_BATCH) {
        let chunk = batch.slice(start, start + EMBED_BATCH);
        while (chunk.length) {
          try {
            const input = chunk.map((picture) => picture.dataURL);
            const answer = await (await api("/v1/embeddings", { body: { model, input } })).json();
            for (const row of answer.data) chunk[row.index].vector = row.embedding;
            chunk = [];
          } catch (error) {
            // One undecodable file names itself (param "input[3]"): drop it, embed the rest.
            const bad = /^input\[(\d+)\]$/.exec((error instanceof APIError && error.param) || "");
            if (!bad) throw error;
            const [picture] = chunk.splice(Number(bad[1]), 1);
            failures.push(`${picture.name}: ${error.message}`);
            pictures = pictures.filter((other) => other !== picture);
          }
        }
        showPictures();
      }
    } catch (error) {
      showError($("search-error"), error);
      searchStatus.textContent = "Embedding failed.";
      return;
    }
    if (failures.length) showError($("search-error"), new Error(failures.join("; ")));
    refreshPool();
    const embedded = pictures.filter((picture) => picture.vector).length;
    searchStatus.textContent = `${embedded} images embedded with ${model}.`;
    if (lastQuery !== null) await rank(lastQuery);
  }

  async function rank(query) {
    lastQuery = query;
    if (!pictures.length) {
      searchStatus.textContent = `No images to rank for “${query}”: add some first.`;
      return;
    }
    const model = $("search-model").value;
    const answer = await (await api("/v1/embeddings", { body: { model, input: query } })).json();
    const target = answer.data[0].embedding;
    for (const picture of pictures) {
      // Both vectors are L2-normalised: the dot product is the cosine similarity.
      picture.score = picture.vector
        ? picture.vector.reduce((sum, value, index) => sum + value * target[index], 0)
        : null;
    }
    // Sort is stable: equal scores keep the order they were added in.
    pictures.sort((a, b) => (b.score ?? -Infinity) - (a.score ?? -Infinity));
    showPictures();
    searchStatus.textContent =
      `Ranked ${pictures.length} images for “${query}”: ${pictures[0].name} matches best.`;
  }

  $("search-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("search-error").hidden = true;
    try {
      await rank($("query").value);
    } catch (error) {
      showError($("search-error"), error);
    }
  });

  $("files").addEventListener("change", async (event) => {
    await addFiles(event.target.files);
    event.target.value = ""; // choosing the same file again adds it again
  });

  $("search-model").addEventListener("change", async () => {
    // Vectors of another model live in another space: embed everything again.
    for (const picture of pictures) {
      picture.vector = null;
      picture.score = null;
    }
    showPictures();
    if (pictures.length) await embedPictures(pictures);
  });

  $("clear-images").addEventListener("click", () => {
    for (const picture of pictures) URL.revokeObjectURL(picture.url);
    pictures = [];
    lastQuery = null;
    showPictures();
    searchStatus.textContent = "No images yet.";
  });

  const dropZone = $("drop-zone");
  dropZone.addEventListener("dragover", (event) => {
    event.preventDefault();
    dropZone.classList.add("over");
  });
  dropZone.addEventListener("dragleave", () => dropZone.classList.remove("over"));
  dropZone.addEventListener("drop", (event) => {
    event.preventDefault();
    dropZone.classList.remove("over");
    addFiles(event.dataTransfer.files);
  });
  // A file dropped beside the zone must not navigate away from the page (and its pictures).
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());

  // -- start --------------------------------------------------------------------------------

  function showError(element, error) {
    element.textContent = error instanceof APIError ? `${error.message} (${error.status})` : error.message;
    element.hidden = false;
    // Where the user will read it: scrolled into sight if the panel runs below the window.
    element.scrollIntoView({ block: "nearest" });
  }

  // What the Edit panel (edit.js) shares with the rest of the page.
  window.limnerPlayground = { api, followStream, showError, refreshPool };

  setFormsEnabled(false);
  connect();
})();
