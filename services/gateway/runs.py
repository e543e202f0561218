"""What the gateway holds about Tinker runs: which owner (API key) each run,
sampling session, session and checkpoint belongs to. Read from memory;
every change is written to Redis (store.py) before the request that made it
is answered, and a starting gateway loads the tables back: a killed gateway
forgets nothing a client was told.

A Tinker run is a C-LoRA tenant with a gateway-chosen id ("tk-" + hex, so it
passes ``is_experiment_id``). Tinker paths map to (run, version or checkpoint
name) held here; a path from a request is only ever looked up, never used
as a file path. Anything owned by another key reads as absent (``None``).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from services.gateway.store import RedisTables
from shared.messages import is_experiment_id
from shared.tinker_messages import TINKER_RUN_PREFIX

TINKER_SCHEME = "tinker://"
SAMPLER_SEGMENT = "sampler_weights"
STATE_SEGMENT = "weights"


def new_run_id() -> str:
    run_id = TINKER_RUN_PREFIX + secrets.token_hex(8)
    assert is_experiment_id(run_id)
    return run_id


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


@dataclass
class Run:
    run_id: str
    owner: str
    lora_rank: int
    base_model: str
    latest_version: int = 0
    sampler_paths: dict[str, int] = field(default_factory=dict)  # checkpoint name -> adapter version
    state_names: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class SamplingSession:
    session_id: str
    owner: str
    run_id: str  # for the base model: a run id of the owner's own, never created on the trainer
    adapter_version: int  # 0: the base model
    model_path: str | None
    base_model: str


@dataclass(frozen=True)
class TinkerPath:
    run_id: str
    kind: str  # SAMPLER_SEGMENT | STATE_SEGMENT
    name: str

    @property
    def text(self) -> str:
        return f"{TINKER_SCHEME}{self.run_id}/{self.kind}/{self.name}"


def parse_tinker_path(path: object) -> TinkerPath | None:
    """``tinker://<run>/<sampler_weights|weights>/<name>`` or None."""
    if not isinstance(path, str) or not path.startswith(TINKER_SCHEME):
        return None
    parts = path[len(TINKER_SCHEME):].split("/")
    if len(parts) != 3 or not is_experiment_id(parts[0]) or parts[1] not in (SAMPLER_SEGMENT, STATE_SEGMENT):
        return None
    return TinkerPath(parts[0], parts[1], parts[2])


class Registry:
    """Lookups are sync (memory); changes are async: written through to
    ``tables`` (None: memory only) before they count."""

    def __init__(self, tables: RedisTables | None = None) -> None:
        self._tables = tables
        self._runs: dict[str, Run] = {}
        self._sampling: dict[str, SamplingSession] = {}
        self._sessions: dict[str, str] = {}  # session id -> owner
        # The SDK names a run made by load_weights "<session>:train:<seq>" itself.
        self._aliases: dict[str, str] = {}

    async def load(self) -> None:
        """The tables an earlier gateway wrote (entries that do not check out are skipped)."""
        if self._tables is None:
            return
        runs = await self._tables.load("runs", Run)
        self._runs = {rid: run for rid, run in runs.items() if rid == run.run_id and is_experiment_id(rid)}
        sampling = await self._tables.load("sampling", SamplingSession)
        self._sampling = {sid: s for sid, s in sampling.items() if sid == s.session_id}
        self._sessions = await self._tables.load("sessions", str)
        self._aliases = {a: rid for a, rid in (await self._tables.load("aliases", str)).items() if rid in self._runs}

    def counts(self) -> dict[str, int]:
        return {"runs": len(self._runs), "sessions": len(self._sessions), "sampling_sessions": len(self._sampling)}

    async def _put(self, table: str, field: str, value: object) -> None:
        if self._tables is not None:
            await self._tables.put(table, field, value)

    # sessions (the SDK's client sessions: only owned, heartbeated)
    async def add_session(self, owner: str) -> str:
        session_id = new_id("sess")
        await self._put("sessions", session_id, owner)
        self._sessions[session_id] = owner
        return session_id

    def session_owned(self, session_id: object, owner: str) -> bool:
        return isinstance(session_id, str) and self._sessions.get(session_id) == owner

    # runs
    async def add_run(self, run: Run) -> None:
        """A new run, or a changed one (versions, paths, states): stored whole."""
        await self._put("runs", run.run_id, run)
        self._runs[run.run_id] = run

    async def add_alias(self, alias: str, run_id: str) -> None:
        await self._put("aliases", alias, run_id)
        self._aliases[alias] = run_id

    def run(self, run_id: object, owner: str) -> Run | None:
        if not isinstance(run_id, str):
            return None
        run = self._runs.get(self._aliases.get(run_id, run_id))
        return run if run is not None and run.owner == owner else None

    def runs_of(self, owner: str) -> list[Run]:
        return [run for run in self._runs.values() if run.owner == owner]

    # sampling sessions
    async def add_sampling(self, owner: str, run_id: str, version: int, model_path: str | None,
                           base_model: str) -> str:
        session = SamplingSession(new_id("samp"), owner, run_id, version, model_path, base_model)
        await self._put("sampling", session.session_id, session)
        self._sampling[session.session_id] = session
        return session.session_id

    def sampling(self, session_id: object, owner: str) -> SamplingSession | None:
        found = self._sampling.get(session_id) if isinstance(session_id, str) else None
        return found if found is not None and found.owner == owner else None

    # paths
    def sampler_version(self, path: TinkerPath, owner: str) -> tuple[Run, int] | None:
        run = self.run(path.run_id, owner)
        if run is None or path.kind != SAMPLER_SEGMENT or path.name not in run.sampler_paths:
            return None
        return run, run.sampler_paths[path.name]

    def state_of(self, path: TinkerPath, owner: str) -> Run | None:
        run = self.run(path.run_id, owner)
        if run is None or path.kind != STATE_SEGMENT or path.name not in run.state_names:
            return None
        return run
