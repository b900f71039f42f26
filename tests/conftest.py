import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).parent))

# Fixtures of the local fake Hugging Face Hub (fake_hub, hub_client_env) and a finished HF export (export).
pytest_plugins = ["hub_server", "fixtures.pristine", "fixtures.hf_export"]
