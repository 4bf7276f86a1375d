"""The paper's four reproduced systems (SpecMD section 5) as engine settings: ``evaluate.py --system NAME``.

Pure data, so the front end can check a ``--system`` name before the engine (torch) is imported.
"""

from __future__ import annotations

from typing import Any

#: The paper's four reproduced systems (SpecMD section 5), as engine settings.
SYSTEMS: dict[str, dict[str, Any]] = {
    "eliseev_mazur": dict(policy="lru", prefetch="topk", miss="fetch", routing="standard"),
    "zhu": dict(policy="score", prefetch="percentile", miss="substitute", routing="standard"),
    "mixturecache": dict(policy="lru", prefetch="none", miss="fetch", routing="cache-aware"),
    "hobbit": dict(policy="lhu", prefetch="topk", miss="precision-cascade", routing="standard"),
}
