"""What the examples share, importing no framework: the scripted LLM stand-in's answers, the
device and thread setup, and the one-line error for a missing dependency."""

from __future__ import annotations

import sys
from typing import NoReturn

# The scripted LLM stand-in: the first rule whose keyword is in the user's words answers.
RULES = [
    (("parcel", "package", "order", "arrive"), "I am sorry to hear that. Could you tell me what was in the parcel?"),
    (("jacket", "shoes", "book", "blue", "red"), "Thank you. I found the order, and it is at the depot. It will reach you tomorrow."),
    (("refund", "money"), "I can refund it today. The money will be back on your card within three days."),
    (("thank", "bye", "great"), "You are welcome. Have a lovely day!"),
]
FALLBACK = "I see. Could you tell me a little more?"


def scripted_reply(text: str) -> str:
    words = text.lower()
    return next((reply for keys, reply in RULES if any(k in words for k in keys)), FALLBACK)


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def missing_dependency(error: BaseException, what: str, install: str) -> NoReturn:
    """A dependency the example needs is not installed (or cannot load): say which, and how to get it."""
    fail(f"this example needs {what}, which could not be imported ({error}). Install it with: {install}")


def setup_runtime(device: str | None, threads: int | None) -> str:
    """Check the device (auto: cuda when usable, else cpu) and set torch's threads (default: the
    CPUs this process may use, or $CSM_THREADS); a bad device is a one-line error. Returns the device."""
    from csm_plugin.cli import resolve_device
    from csm_plugin.errors import CSMError
    from csm_plugin.threads import configure_threads

    try:
        device = resolve_device(device)
        configure_threads(threads)
    except CSMError as e:
        fail(str(e))
    return device


def offline_checkpoint() -> str:
    """A small random checkpoint in a temporary folder (its audio is noise, at a safe level)."""
    import tempfile

    from csm_plugin.models.loading import make_test_checkpoint

    path = make_test_checkpoint(tempfile.mkdtemp(prefix="csm-test-"), "hf", seed=0)
    print("using a small random test checkpoint: the plumbing is real, the audio is noise", file=sys.stderr, flush=True)
    return str(path)
