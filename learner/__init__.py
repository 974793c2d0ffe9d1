"""The driver side. Importing it switches the Hugging Face libraries offline for this process before any of them
is imported (every model loads from a local directory; Ray workers get the same switches from WORKER_ENV)."""

import os

for _switch in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_switch, "1")
