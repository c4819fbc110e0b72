"""What the routes of one app share: its engine, store, limits, backbone class count and request models, and
the helpers more than one route needs (error answers, the generate log, views of sources)."""

from dataclasses import dataclass
from pathlib import Path

from ..errors import CdmError
from ..store import Store, StoreError
from .engine import Engine, Limits
from .schemas import Schemas

__all__ = ["Context"]


@dataclass(frozen=True)
class Context:
    engine: Engine
    store_path: Path
    limits: Limits
    n_classes: int
    schemas: Schemas

    def cdm_answer(self, exc: CdmError) -> tuple[int, str]:
        """The status and message of the answer to a :class:`CdmError` (404 for an unknown source, else 422)."""
        msg = str(exc).replace(str(self.store_path), "<store>")  # no server paths in answers
        if msg.startswith(("unknown source", "unknown compartment")):
            msg = msg.split("; known:")[0]  # never list other sources to the caller
        status = 404 if isinstance(exc, StoreError) and msg.startswith(("unknown source", "unknown compartment")) \
            else 422
        return status, msg

    def log_generate(self, key_name: str, details: dict) -> None:
        """Audit log record of a generate request (in an ``io`` thread)."""
        self.engine.io.store().record("generate", key_name, details, actor=key_name)

    def source_rows(self) -> tuple[list[dict], set[str]]:
        """Every source, and the names of those with a trained compartment (in an ``io`` thread)."""
        st = self.engine.io.store()
        return st.sources(), {r["cid"] for r in st.compartments(kind="compartment")}

    @staticmethod
    def learned(st: Store, name: str, ready: set[str]) -> dict:
        """From the compartment's manifest: ``learned`` (False: training kept step 0, it equals the backbone; None
        when it does not say or there is no compartment) and ``text`` (it reads captions: send a ``prompt``)."""
        if name not in ready:
            return {"learned": None, "text": False}
        try:
            manifest = st.compartment(name)["manifest"]
        except StoreError:  # forgotten meanwhile
            return {"learned": None, "text": False}
        value = manifest.get("learned")
        return {"learned": value if isinstance(value, bool) else None,
                "text": bool((manifest.get("config") or {}).get("text_encoder"))}

    def source_view(self, s: dict, ready: set[str], facts: dict | None = None) -> dict:
        """A source as the API shows it (:class:`~cdm.server.schemas.SourceInfo`); ``facts``: :meth:`learned`."""
        facts = facts or {"learned": None, "text": False}
        return {"name": s["id"], "n": s["n"], "classes": s["classes"], "tags": s["tags"], "ready": s["id"] in ready,
                "training": self.engine.active_job(s["id"]) is not None, **facts}
