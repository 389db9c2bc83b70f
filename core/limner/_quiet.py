"""What a command prints: limner's own lines, not its libraries' bars and warnings.

transformers, diffusers and huggingface_hub print loading bars ("Loading weights",
"Loading pipeline components...") and advisory warnings (a missing torchvision, twice) on
every load. A command line quiets them before they are imported, unless ``--verbose``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import MutableMapping

__all__ = ["QUIET_ENVIRONMENT", "quiet_third_parties", "verbose_logging"]

QUIET_ENVIRONMENT = {
    # huggingface_hub's download bars, and transformers' bars, which follow this switch.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_VERBOSITY": "error",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DIFFUSERS_VERBOSITY": "error",
    # diffusers' "Loading pipeline components..." bar has no switch of its own: every tqdm bar
    # whose caller did not choose is off. limner's own bars pass ``disable`` explicitly.
    "TQDM_DISABLE": "1",
}


def quiet_third_parties(environ: MutableMapping[str, str] = os.environ) -> None:
    """Silence libraries' bars, warnings and log records for the rest of the process.

    Call it before transformers, diffusers, huggingface_hub or tqdm are imported; variables
    the user set already are kept. Log records nobody handles (limner's own included, which a
    command reports as its error line instead) are dropped rather than printed as Python's
    last resort.
    """
    for name, value in QUIET_ENVIRONMENT.items():
        environ.setdefault(name, value)
    warnings.simplefilter("ignore")
    logging.getLogger().addHandler(logging.NullHandler())


def verbose_logging() -> None:
    """Show limner's log (loads, evictions) and whatever its libraries print."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
