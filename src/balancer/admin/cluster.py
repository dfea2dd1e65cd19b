"""The admin endpoint of `balancer serve --workers N`: one balancer's view of the workers.

How it works:
- Each worker serves the admin API on its control socket (a Unix socket of the
  supervisor's private directory, `balancer.runtime.supervisor`), plus WORKER_STATE:
  its backends' health states (GET) and the states relayed to it (PUT). The supervisor
  talks to each worker there, with the write token when there is one.
- `ClusterAdmin` serves the configured admin address with the same guard (Host, Origin,
  tokens) as a single process. Reads are asked of every ready worker and merged
  (`balancer.runtime.merging`): `/status`, `/api/services`, `/api/history` summed, with
  backend states from the checking worker; `/metrics` summed plus each worker's samples under a
  `worker` label; `/status?worker=I` is worker I's own document; `/api/workers` lists the
  workers. Writes (backend state, weight, add, remove, reload, certificates reload) are
  sent to every ready worker: the answer is the workers' when they all agree, else a
  502 that says which workers applied it and which did not. A backend write to a
  service whose backends are in etcd goes to one worker, which makes it in etcd; every
  worker applies it from its own watch.
- The relay: every half health interval (the shortest of the services', at least
  MIN_RELAY), each ready worker's states are read and `relay_plan` sets what differs,
  so a transition the checking worker's checks see (or an ejection any worker's traffic
  sees) reaches the others within half an interval and a round trip. The checking worker
  is worker 0 at first; while it is not ready (dead, restarting) the lowest ready worker
  is elected and checks from then on (`_elect`). A restarted worker is first brought to
  the runtime API's changes of a worker that lived on (admin state, weight, backends
  added or removed), except in services whose backends are in etcd: it reads those there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from balancer.admin.app import RUNNER_OPTIONS, AdminServer, guarded_app
from balancer.admin.checks import ApiError, api_handler, error_response
from balancer.admin.handlers import SERVER_KEY, STATIC_DIR, handle_index, handle_openapi
from balancer.admin.merged_metrics import merge_metrics
from balancer.admin.security import OPEN, READ, WRITE, AdminGuard, admin_token
from balancer.config.discovery import etcd_name
from balancer.core.states import DRAIN, MAINT
from balancer.runtime.merging import merge_history, merge_status, relay_plan
from balancer.runtime.workers import apply_states, backend_states

if TYPE_CHECKING:
    from balancer.runtime.supervisor import Supervisor, WorkerSlot

log = logging.getLogger("balancer")

WORKER_STATE = "/_worker/state"
WORKER_CHECKS = "/_worker/checks"
CALL_TIMEOUT = 5.0
MIN_RELAY = 0.05
API_WORDS = {DRAIN: "drain", MAINT: "maint"}


# -- the worker's side ---------------------------------------------------------------


async def handle_worker_state(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    doc = {"pid": os.getpid(), "ready": server.ready, "services": backend_states(server)}
    return web.json_response(doc)


async def handle_relayed_state(request: web.Request) -> web.Response:
    try:
        doc = json.loads(await request.read())
    except ValueError:
        raise ApiError(400, "expected a JSON object of services") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "expected a JSON object of services")
    return web.json_response({"changed": apply_states(request.app[SERVER_KEY], doc)})


async def handle_take_checks(request: web.Request) -> web.Response:
    from balancer.runtime.workers import WorkerServer

    server = request.app[SERVER_KEY]
    if not isinstance(server, WorkerServer):
        raise ApiError(404, "not a worker")
    return web.json_response({"taken": server.take_checks()})


def add_worker_routes(admin: AdminServer) -> None:
    """A worker's admin API also reads and takes health states (before it starts), and
    takes over the health checks."""
    admin.app.router.add_get(WORKER_STATE, api_handler(handle_worker_state, access=READ))
    admin.app.router.add_put(WORKER_STATE, api_handler(handle_relayed_state, access=WRITE))
    admin.app.router.add_put(WORKER_CHECKS, api_handler(handle_take_checks, access=WRITE))


# -- the supervisor's side -----------------------------------------------------------


class WorkerUnreachable(Exception):
    pass


class ClusterAdmin:
    """The supervisor's admin endpoint (when the config enables it) and the state relay."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.guard = AdminGuard(supervisor.config.admin)
        self.app = guarded_app(self.guard)
        token = admin_token(supervisor.config.admin)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        r = self.app.router
        r.add_get("/status", api_handler(self.status, access=READ))
        r.add_get("/api/services", api_handler(self.services, access=READ))
        r.add_get("/api/history", api_handler(self.history, access=READ))
        r.add_get("/metrics", api_handler(self.metrics, access=READ))
        r.add_get("/api/workers", api_handler(self.workers, access=READ))
        r.add_get("/api/openapi.json", api_handler(handle_openapi, access=OPEN))
        r.add_get("/", handle_index)
        r.add_static("/static/", STATIC_DIR)
        backend_path = "/api/services/{service}/backends/{address}"
        write = api_handler(self.fan_out, access=WRITE)
        r.add_put(backend_path, write)
        r.add_delete(backend_path, write)
        r.add_post("/api/services/{service}/backends", write)
        r.add_post("/api/reload", write)
        r.add_post("/api/certificates/reload", write)
        self.runner: web.AppRunner | None = None
        self.sessions: dict[int, aiohttp.ClientSession] = {}
        self._relay: asyncio.Task[None] | None = None
        self._synced: dict[int, int] = {}
        """A worker's index -> the start of it whose runtime API state is brought up."""

    # -- talking to workers --------------------------------------------------------
    def _session(self, slot: WorkerSlot) -> aiohttp.ClientSession:
        session = self.sessions.get(slot.index)
        if session is None or session.closed:
            session = self.sessions[slot.index] = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=slot.control_path),
                timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT),
            )
        return session

    async def call(
        self, slot: WorkerSlot, method: str, path: str, body: bytes | None = None
    ) -> tuple[int, bytes]:
        headers = dict(self.headers)
        if body is not None:
            headers["Content-Type"] = "application/json"
        url = f"http://localhost{path}"
        try:
            async with self._session(slot).request(method, url, data=body, headers=headers) as r:
                return r.status, await r.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise WorkerUnreachable(f"worker {slot.index}: {exc or type(exc).__name__}") from exc

    def ready(self) -> list[WorkerSlot]:
        return [s for s in self.supervisor.slots if s.ready]

    async def ask_all(self, path: str) -> dict[int, bytes]:
        """What every ready worker answers to GET `path` (those that fail left out)."""
        slots = self.ready()
        answers = await asyncio.gather(
            *(self.call(s, "GET", path) for s in slots), return_exceptions=True
        )
        out: dict[int, bytes] = {}
        for slot, answer in zip(slots, answers, strict=True):
            if isinstance(answer, BaseException):
                log.debug("admin: %s: %s", path, answer)
            elif answer[0] == 200:
                out[slot.index] = answer[1]
        if not out:
            raise ApiError(503, "no worker answers (starting or restarting)")
        return out

    async def documents(self, path: str) -> dict[int, dict[str, Any]]:
        return {i: json.loads(body) for i, body in (await self.ask_all(path)).items()}

    # -- reads ------------------------------------------------------------------------
    async def status(self, request: web.Request) -> web.Response:
        which = request.query.get("worker")
        if which is not None:
            slot = next((s for s in self.ready() if str(s.index) == which), None)
            if slot is None:
                raise ApiError(404, f"no ready worker {which[:20]!r}")
            code, body = await self.call(slot, "GET", "/status")
            return web.Response(status=code, body=body, content_type="application/json")
        docs = await self.documents("/status")
        return web.json_response(merge_status(docs, self.supervisor.checker))

    async def services(self, request: web.Request) -> web.Response:
        docs = await self.documents("/api/services")
        return web.json_response(merge_status(docs, self.supervisor.checker))

    async def history(self, request: web.Request) -> web.Response:
        path = request.path_qs
        return web.json_response(merge_history(await self.documents(path)))

    async def metrics(self, request: web.Request) -> web.Response:
        texts = {i: body.decode() for i, body in (await self.ask_all("/metrics")).items()}
        body = merge_metrics(texts).encode()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def workers(self, request: web.Request) -> web.Response:
        docs = await self.documents("/status")
        out = []
        for slot in self.supervisor.slots:
            doc = docs.get(slot.index)
            services = doc["services"] if doc is not None else {}
            out.append(
                {
                    "index": slot.index,
                    "pid": slot.pid,
                    "ready": slot.ready,
                    "checks": slot.index == self.supervisor.checker,
                    "restarts": slot.restarts,
                    "started_at": slot.started_wall,
                    "last_exit": slot.last_exit,
                    "client_connections": {n: s["client_connections"] for n, s in services.items()},
                    "requests": {
                        n: sum(b["requests"] for b in s["backends"]) for n, s in services.items()
                    },
                }
            )
        return web.json_response({"sockets": self.supervisor.mode, "workers": out})

    # -- writes ------------------------------------------------------------------------
    def etcd_service(self, name: str | None) -> bool:
        """Whether a service's backends are in etcd: a backend write to it is made there by
        one worker, and every worker applies it from its watch."""
        config = self.supervisor.config
        if name is None or config.discovery is None or config.discovery.kind != "etcd":
            return False
        return any(s.name == name and etcd_name(name, s.discover) for s in config.services)

    async def fan_out(self, request: web.Request) -> web.Response:
        """A runtime API write, made in every ready worker (in one, for etcd's services)."""
        body = await request.read()
        slots = self.ready()
        if not slots:
            raise ApiError(503, "no worker is ready (starting or restarting)")
        if self.etcd_service(request.match_info.get("service")):
            slots = slots[:1]
        supervisor = self.supervisor
        if (
            request.path == "/api/reload"
            and supervisor.reread()
            and not supervisor.sync_listeners()
        ):
            raise ApiError(409, "reload rejected: a new listener cannot be bound (see the log)")
        answers = await asyncio.gather(
            *(self.call(s, request.method, request.path_qs, body or None) for s in slots),
            return_exceptions=True,
        )
        codes: dict[int, int] = {}
        first: tuple[int, bytes] | None = None
        for slot, answer in zip(slots, answers, strict=True):
            if isinstance(answer, BaseException):
                codes[slot.index] = 0
                continue
            codes[slot.index] = answer[0]
            first = first or answer
        statuses = set(codes.values())
        if first is not None and len(statuses) == 1:
            return web.Response(
                status=first[0],
                body=first[1],
                content_type="application/json",
                headers={"X-Balancer-Workers": ",".join(map(str, codes))},
            )
        done = [i for i, c in codes.items() if 200 <= c < 300]
        failed = {i: c or "unreachable" for i, c in codes.items() if not 200 <= c < 300}
        return error_response(
            502,
            f"applied by workers {done or 'none'}; not by {failed}: see /api/workers and "
            "/status?worker=I, and repeat the request",
        )

    # -- the relay ----------------------------------------------------------------------
    def relay_interval(self) -> float:
        intervals = [s.health.interval for s in self.supervisor.config.services]
        return max(MIN_RELAY, min(intervals, default=1.0) / 2)

    async def relay_once(self) -> None:
        slots = self.ready()
        answers = await asyncio.gather(
            *(self.call(s, "GET", WORKER_STATE) for s in slots), return_exceptions=True
        )
        states: dict[int, Any] = {}
        for slot, answer in zip(slots, answers, strict=True):
            if not isinstance(answer, BaseException) and answer[0] == 200:
                states[slot.index] = json.loads(answer[1])["services"]
        by_index = {s.index: s for s in slots}
        for index in list(states):
            slot = by_index[index]
            if self._synced.get(index) != slot.starts:
                if slot.restarts:
                    await self._sync(slot, states)
                self._synced[index] = slot.starts
        await self._elect(slots)
        plan = relay_plan(states, source=self.supervisor.checker)
        await asyncio.gather(
            *(
                self.call(by_index[i], "PUT", WORKER_STATE, json.dumps(doc).encode())
                for i, doc in plan.items()
            ),
            return_exceptions=True,
        )

    async def _elect(self, ready: list[WorkerSlot]) -> None:
        """The checking worker gone (dead, restarting), the lowest ready one checks."""
        supervisor = self.supervisor
        if not ready or any(s.index == supervisor.checker for s in ready):
            return
        for slot in ready:
            try:
                code, _ = await self.call(slot, "PUT", WORKER_CHECKS, b"{}")
            except WorkerUnreachable:
                continue
            if code == 200:
                log.warning(
                    "worker %d is not ready: worker %d checks the backends from now on",
                    supervisor.checker,
                    slot.index,
                )
                supervisor.checker = slot.index
                return

    async def _sync(self, slot: WorkerSlot, states: dict[int, Any]) -> None:
        """A restarted worker takes the runtime API's changes of a worker that lived on."""
        others = [i for i in states if i != slot.index and self._synced.get(i) is not None]
        if not others:
            return
        ref, mine = states[min(others)], states[slot.index]
        calls: list[tuple[str, str, dict[str, Any] | None]] = []
        for name, backends in ref.items():
            own = mine.get(name)
            if own is None or self.etcd_service(name):
                continue
            base = f"/api/services/{name}/backends"
            for address, want in backends.items():
                have = own.get(address)
                change: dict[str, Any] = {}
                if have is None:
                    calls.append(("POST", base, {"address": address, "weight": want["weight"]}))
                    have = {"admin_state": "ready", "weight": want["weight"]}
                if have["admin_state"] != want["admin_state"]:
                    change["state"] = API_WORDS.get(want["admin_state"], "up")
                if have["weight"] != want["weight"]:
                    change["weight"] = want["weight"]
                if change:
                    calls.append(("PUT", f"{base}/{address}", change))
            calls.extend(("DELETE", f"{base}/{a}", None) for a in own if a not in backends)
        for method, path, doc in calls:
            data = json.dumps(doc).encode() if doc is not None else None
            code, _ = await self.call(slot, method, path, data)
            log.info("worker %d restarted: %s %s -> %d", slot.index, method, path, code)

    async def _relay_forever(self) -> None:
        while True:
            await asyncio.sleep(self.relay_interval())
            try:
                await self.relay_once()
            except Exception:
                log.exception("relaying health states between workers failed")

    # -- start, stop ----------------------------------------------------------------------
    async def start(self, sock: socket.socket | None) -> tuple[str, int] | None:
        self._relay = asyncio.create_task(self._relay_forever(), name="worker state relay")
        if sock is None:
            return None
        runner = web.AppRunner(self.app, **RUNNER_OPTIONS)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        self.runner = runner
        host, port = sock.getsockname()[:2]
        self.guard.listening_on(str(host))
        return str(host), int(port)

    async def stop(self) -> None:
        if self._relay is not None:
            self._relay.cancel()
            await asyncio.gather(self._relay, return_exceptions=True)
        if self.runner is not None:
            await self.runner.cleanup()
        for session in self.sessions.values():
            await session.close()
