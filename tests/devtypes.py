"""QEMU 7.2's device type list, as vmspawnd.pcitypes reads it (a snapshot:
tests/test_pcitypes.py checks it against the installed QEMU)."""

import json
from pathlib import Path

from vmspawnd import pcitypes

SNAPSHOT = Path(__file__).parent / "data" / "qemu-7.2-device-types.json"
TYPES = pcitypes.from_json(json.loads(SNAPSHOT.read_text()))
