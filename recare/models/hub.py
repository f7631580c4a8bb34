"""The Hugging Face hub: offline flags, a bounded reachability probe, and the messages for a model
that is neither cached nor downloadable right now (loading fails at once, never hangs).
"""

from __future__ import annotations

import os
import threading

HUB_PROBE_TIMEOUT_S = 3.0  # how long to wait for the hub before calling it offline


def hub_offline_flag() -> bool:
    """True when the user asked for offline mode (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hub_reachable(timeout: float | None = None) -> bool:
    """Whether the Hugging Face hub answers within `timeout` seconds (proxies from the env are honoured).

    The probe runs in a daemon thread so that even a hanging DNS lookup cannot block the caller.

    Args:
        timeout: seconds to wait in all (default `HUB_PROBE_TIMEOUT_S`, read at call time).
    """
    timeout = HUB_PROBE_TIMEOUT_S if timeout is None else timeout
    if hub_offline_flag():
        return False
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    endpoint = getattr(constants, "ENDPOINT", "https://huggingface.co")
    answer: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
            answer.append(True)
        except urllib.error.HTTPError:
            answer.append(True)  # the server answered, even if with an error code
        except Exception:
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


def offline_message(what: str, name: str) -> str:
    reason = "HF_HUB_OFFLINE is set" if hub_offline_flag() else "the Hugging Face hub cannot be reached"
    return (
        f"{what} {name!r} is not in the local Hugging Face cache and {reason}. "
        f"Run once with network access so it can download, or pass a local folder, "
        f"or use the bundled 'mini-world'."
    )


def dtype_kwarg(package: str, renamed_in: str) -> str:
    """`dtype` in newer diffusers/transformers, `torch_dtype` (now deprecated there) in older ones."""
    from importlib.metadata import version

    from packaging.version import Version

    return "dtype" if Version(version(package)) >= Version(renamed_in) else "torch_dtype"


def first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
