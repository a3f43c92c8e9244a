"""transformers and peft are optional: sharpkit imports without them."""

from __future__ import annotations

import subprocess
import sys

_SCRIPT = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("transformers", "peft"):
            raise ImportError(f"blocked: {name}")

sys.meta_path.insert(0, Block())
import sharpkit, sharpkit.hf, sharpkit.integrations, sharpkit.balance, sharpkit.optim
assert "transformers" not in sys.modules and "peft" not in sys.modules
try:
    import sharpkit.integrations.trainer
except ImportError as err:
    assert "transformers" in str(err), err
    print("refused:", err)
else:
    raise SystemExit("sharpkit.integrations.trainer imported without transformers")
"""


def test_sharpkit_imports_without_transformers_and_peft() -> None:
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pip install" in proc.stdout
