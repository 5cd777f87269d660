"""Reaching the Hugging Face hub: offline mode when it cannot be reached, so loading cached
weights does not wait out a minute of retries."""

from __future__ import annotations

import contextlib
import os
import socket
import urllib.parse

REACHABILITY_TIMEOUT_S = 3.0


def reachable(url: str) -> bool:
    """Whether a TCP connection to the URL's host opens within REACHABILITY_TIMEOUT_S."""
    parts = urllib.parse.urlparse(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=REACHABILITY_TIMEOUT_S).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def offline_unless_reachable():
    """Switch the Hugging Face hub client to offline mode while loading when the hub cannot
    be reached: cached weights still load, missing ones fail at once instead of after a
    minute of retries. (The client reads HF_HUB_OFFLINE once, at import.)"""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    env_offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    offline = constants.HF_HUB_OFFLINE or env_offline or not reachable(constants.ENDPOINT)
    previous_constant, previous_env = constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    if offline:
        constants.HF_HUB_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous_constant
        if previous_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous_env
