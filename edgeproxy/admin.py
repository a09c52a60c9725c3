"""The edge's admin listener (aiohttp): control panel, admin JSON API, /metrics, /health, /ready.

Pages are server-rendered Jinja2 templates (edgeproxy/templates) with a little JavaScript
(edgeproxy/static); every asset is served from here, nothing from elsewhere. The same data is
JSON under /api/v1/ (docs/admin.md). Partner and gateway-settings changes go through
`edgeproxy.configfile.ConfigFile` only: this module writes nothing itself, and the running edge
picks a written file up by its live reload.

Credentials ([edge.admin]): `Authorization: Bearer <token>` for the API; the panel's login
form takes the token or the password of `password_hash` and sets a session cookie
(HttpOnly, SameSite=Strict); writes with that cookie also need the page's CSRF token in
`X-CSRF-Token`. On a loopback address /health, /ready and /metrics need no credentials (as a
Prometheus scrape expects); elsewhere they need the token too.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import __version__, eventloop
from .adminauth import token_matches, verify_password
from .config import AdminSettings, ConfigError, EdgeConfig
from .configfile import (
    GATEWAY_SETTINGS,
    ConfigFile,
    ConfigRejected,
    NoSuchPartner,
    StaleVersion,
)
from .history import Attempt
from .partners import NEGOTIATION_MATRIX, Negotiation, Partner, PartnerType, Trust, parse_pin

if TYPE_CHECKING:
    from .server import Edge

log = logging.getLogger("edgeproxy.admin")

HERE = Path(__file__).resolve().parent
COOKIE = "edge_admin"
SESSION_LIFETIME = 8 * 3600.0  # seconds
MAX_SESSIONS = 100
OPEN_ON_LOOPBACK = ("/health", "/ready", "/metrics")
EDGE: web.AppKey[Edge] = web.AppKey("edge")
ADMIN: web.AppKey[AdminListener] = web.AppKey("admin")
SESSION = web.RequestKey("session", str)


class ApiError(Exception):
    def __init__(self, status: int, message: str, **fields: Any):
        super().__init__(message)
        self.status, self.message, self.fields = status, message, fields


@dataclass
class Session:
    csrf: str
    expires: float


# --- JSON views ---------------------------------------------------------------------------------

def matrix_json() -> list[dict[str, Any]]:
    """The Lync negotiation matrix (partners.NEGOTIATION_MATRIX), for the form's live check."""
    return [{"tls": tls.value, "sasl": sasl.value, "dialback": dialback, "row": row.number,
             "verdict": row.verdict.value, "methods": sorted(row.methods),
             "message": row.message.format(tls=tls.value)}
            for (tls, sasl, dialback), row in NEGOTIATION_MATRIX.items()]


def attempt_json(a: Attempt | None) -> dict[str, Any] | None:
    return None if a is None else a.to_json()


def partner_json(p: Partner, edge: Edge) -> dict[str, Any]:
    row = p.matrix_row
    monitor = edge.monitor
    return {
        "domain": p.domain, "additional_domains": list(p.additional_domains),
        "description": p.description, "type": p.type.value, "tls": p.tls.value,
        "sasl": p.sasl.value, "dialback": p.dialback, "keepalive": p.keepalive,
        "connection_limit": p.connection_limit, "proxy_fqdn": p.proxy_fqdn,
        "trust": p.trust.value, "pin_sha256": list(p.pin_sha256),
        "certificate": certificate_json(p, edge),
        "matrix": {"row": row.number, "verdict": row.verdict.value,
                   "methods": sorted(row.methods), "message": row.message.format(tls=p.tls)},
        "streams": monitor.partner_stream_counts().get(p.domain, 0),
        "last_failure": attempt_json(monitor.history.last_failure(p.domain)),
        "last_attempt": attempt_json(monitor.history.last(p.domain)),
    }


def certificate_json(p: Partner, edge: Edge) -> dict[str, Any] | None:
    """Issue 15: the partner's current certificate (last connection or probe), and whether
    its key is one of the partner's pins now."""
    seen = edge.partner_certificates.get(p.domain) if p.domain else None
    if seen is None:
        return None
    return {**seen.to_json(), "pinned": p.pinned(seen.spki_sha256)}


def _path(p: Path | None) -> str:
    return str(p.resolve()) if p is not None else ""


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def certificates_json(cfg: EdgeConfig, wall: float) -> dict[str, Any]:
    """What the edge serves: the chain of [edge] certificate, its names, expiry, coverage."""
    from cryptography import x509

    from .identity import certificate_names, fingerprint_sha256, match_identity

    out: dict[str, Any] = {"certificate_file": _path(cfg.certificate),
                           "private_key_file": _path(cfg.private_key), "chain": [],
                           "ca_files": [_path(c) for c in cfg.ca_files],
                           "use_system_ca": cfg.use_system_ca, "error": None}
    if cfg.certificate is None:
        out["error"] = ("no certificate configured: TLS cannot be offered ([edge] certificate "
                        "and private_key)")
        return out
    try:
        chain = x509.load_pem_x509_certificates(cfg.certificate.read_bytes())
    except (OSError, ValueError) as exc:
        out["error"] = f"cannot read {cfg.certificate}: {exc}"
        return out
    now = dt.datetime.fromtimestamp(wall, dt.UTC)
    for i, cert in enumerate(chain):
        left = (cert.not_valid_after_utc - now).total_seconds() / 86400
        entry: dict[str, Any] = {
            "role": "leaf" if i == 0 else "intermediate",
            "subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(),
            "names": list(certificate_names(cert)),
            "not_before": cert.not_valid_before_utc.strftime("%Y-%m-%d %H:%M UTC"),
            "not_after": cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC"),
            "days_left": int(left // 1), "expired": left < 0, "expires_soon": 0 <= left < 30,
            "fingerprint_sha256": fingerprint_sha256(cert),
        }
        if i == 0:
            entry["covers"] = {d: match_identity(cert, d) for d in cfg.domains}
        out["chain"].append(entry)
    return out


# --- the listener ------------------------------------------------------------------------------

class AdminListener:
    def __init__(self, edge: Edge):
        self.edge = edge
        assert edge.cfg.admin is not None
        self._started_with = edge.cfg.admin
        self.sessions: dict[str, Session] = {}
        self._sessions_for = self._credentials()  # sessions end when the credentials change
        self.runner: web.AppRunner | None = None
        self._password_lock = asyncio.Lock()
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined)
        self.templates.filters["when"] = _when
        self.templates.filters["ago"] = lambda s: _ago(self.edge.monitor.wall() - s)

    @property
    def settings(self) -> AdminSettings:
        """The credentials as last reloaded (the address is bound once, at start)."""
        return self.edge.cfg.admin or self._started_with

    @property
    def config_file(self) -> ConfigFile | None:
        path = self.edge.cfg.path
        return ConfigFile(path) if path is not None else None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=256 * 1024)
        app[EDGE], app[ADMIN] = self.edge, self
        r = app.router
        r.add_get("/health", self.health)
        r.add_get("/ready", self.ready)
        r.add_get("/metrics", self.metrics)
        r.add_get("/login", self.login_page)
        r.add_post("/login", self.login)
        r.add_post("/logout", self.logout)
        r.add_static("/static/", HERE / "static")
        r.add_get("/", self.home)
        r.add_get("/partners", self.page_partners)
        r.add_get("/partners/new", self.page_partner_form)
        r.add_get("/partners/{domain}", self.page_partner_form)
        r.add_get("/connections", self.page_connections)
        r.add_get("/history", self.page_history)
        r.add_get("/history/{domain}", self.page_history)
        r.add_get("/settings", self.page_settings)
        r.add_get("/certificates", self.page_certificates)
        r.add_get("/api/v1/partners", self.api_partners)
        r.add_post("/api/v1/partners", self.api_new_partner)
        r.add_get("/api/v1/partners/{domain}", self.api_partner)
        r.add_put("/api/v1/partners/{domain}", self.api_set_partner)
        r.add_delete("/api/v1/partners/{domain}", self.api_remove_partner)
        r.add_get("/api/v1/matrix", self.api_matrix)
        r.add_get("/api/v1/streams", self.api_streams)
        r.add_get("/api/v1/history", self.api_history_index)
        r.add_get("/api/v1/history/{domain}", self.api_history)
        r.add_get("/api/v1/settings", self.api_settings)
        r.add_put("/api/v1/settings", self.api_set_settings)
        r.add_get("/api/v1/certificates", self.api_certificates)
        r.add_post("/api/v1/partners/{domain}/probe", self.api_probe)  # issue 13
        r.add_post("/api/v1/partners/{domain}/pin", self.api_pin)  # issue 15
        r.add_get("/api/v1/partners/{domain}/probes", self.api_probes)
        r.add_get("/api/v1/status", self.api_status)
        return app

    async def start(self) -> None:
        addr = self.settings.listen
        self.runner = web.AppRunner(self.app(), access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, addr.host, addr.port, reuse_address=True).start()
        log.info("admin listener (control panel, /api/v1, /metrics) on http://%s/", addr)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    # -- credentials ---------------------------------------------------------------------------

    def _credentials(self) -> tuple[str | None, str | None]:
        return self.settings.token, self.settings.password_hash

    def _session(self, request: web.Request) -> str | None:
        if self._credentials() != self._sessions_for:  # a reload changed them
            self.sessions.clear()
            self._sessions_for = self._credentials()
        sid = request.cookies.get(COOKIE)
        s = self.sessions.get(sid or "")
        if sid is None or s is None:
            return None
        if s.expires < time.monotonic():
            del self.sessions[sid]
            return None
        return sid

    def _bearer_ok(self, request: web.Request) -> bool:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        token = self.settings.token
        return scheme.lower() == "bearer" and token is not None and token_matches(
            given.strip(), token)

    async def _check_password(self, password: str) -> bool:
        line = self.settings.password_hash
        if line is None or not password:
            return False
        async with self._password_lock:  # scrypt is ~32 MiB: one at a time, off the loop
            return await asyncio.get_running_loop().run_in_executor(
                None, verify_password, password, line)

    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                          ) -> web.StreamResponse:
        path = request.path
        api = path.startswith("/api/")
        try:
            if path in OPEN_ON_LOOPBACK and self._started_with.loopback:  # the bound address
                return await handler(request)
            if path in ("/login", "/logout") or path.startswith("/static/"):
                return await handler(request)
            if self.settings.token is None and self.settings.password_hash is None:
                raise ApiError(403, "the admin API and control panel are disabled: set token "
                               "or password_hash in [edge.admin]")
            if self._bearer_ok(request):
                return await handler(request)
            sid = self._session(request)
            if sid is None:
                if api or path in OPEN_ON_LOOPBACK:
                    raise ApiError(401, "missing or invalid credentials: send 'Authorization: "
                                   "Bearer <token>' ([edge.admin] token)")
                raise web.HTTPSeeOther(f"/login?next={path}")
            if request.method not in ("GET", "HEAD") and not secrets.compare_digest(
                    request.headers.get("X-CSRF-Token", "").encode(),
                    self.sessions[sid].csrf.encode()):
                raise ApiError(403, "missing or wrong X-CSRF-Token for a cookie-authenticated "
                               "change (reload the page)")
            request[SESSION] = sid
            return await handler(request)
        except ApiError as exc:
            return web.json_response({"error": exc.message, **exc.fields}, status=exc.status)
        except web.HTTPNotFound:
            if not api:
                raise
            return web.json_response({"error": f"no such endpoint: {request.method} {path}"},
                                     status=404)
        except web.HTTPMethodNotAllowed:
            return web.json_response(
                {"error": f"{request.method} is not supported on {path}"}, status=405)

    async def home(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/partners")

    async def login_page(self, request: web.Request) -> web.Response:
        return self._render("login.html", request, error="",
                            next=_safe_next(request.query.get("next", "/partners")))

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        secret = str(form.get("secret", ""))
        nxt = _safe_next(str(form.get("next", "/partners")))
        ok = bool(secret) and ((self.settings.token is not None
                                and token_matches(secret, self.settings.token))
                               or await self._check_password(secret))
        if not ok:
            log.warning("admin login refused from %s", request.remote)
            await asyncio.sleep(0.5)  # slows guessing down
            return self._render("login.html", request, status=401, next=nxt,
                                error="That is not the token or the password of [edge.admin].")
        now = time.monotonic()
        for sid, s in list(self.sessions.items()):
            if s.expires < now:
                del self.sessions[sid]
        while len(self.sessions) >= MAX_SESSIONS:
            del self.sessions[next(iter(self.sessions))]
        sid = secrets.token_urlsafe(32)
        self.sessions[sid] = Session(secrets.token_urlsafe(24), now + SESSION_LIFETIME)
        log.info("admin login from %s", request.remote)
        resp = web.HTTPSeeOther(nxt)
        resp.set_cookie(COOKIE, sid, httponly=True, samesite="Strict", path="/",
                        max_age=int(SESSION_LIFETIME))
        raise resp

    async def logout(self, request: web.Request) -> web.StreamResponse:
        self.sessions.pop(request.cookies.get(COOKIE, ""), None)
        resp = web.HTTPSeeOther("/login")
        resp.del_cookie(COOKIE, path="/")
        raise resp

    # -- health, readiness, metrics ------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "version": __version__,
                                  "event_loop": eventloop.running()})

    async def ready(self, request: web.Request) -> web.Response:
        servers = self.edge.servers
        listening = bool(servers) and all(s.is_serving() for s in servers)
        links = sorted(getattr(self.edge.router, "components", {}))
        return web.json_response({"ready": listening, "listeners": len(servers),
                                  "gateway_links": links}, status=200 if listening else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.edge.monitor.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    # -- data ----------------------------------------------------------------------------------

    def _file_state(self) -> tuple[EdgeConfig, str | None, list[str]]:
        """The partners as the file has them (the source of truth), its version, and the
        problems when the file cannot be read (then the running configuration is shown)."""
        cf = self.config_file
        if cf is None:
            return self.edge.cfg, None, ["the edge was started without a configuration file: "
                                         "nothing can be changed here"]
        try:
            cfg, version = cf.load()
        except ConfigError as exc:
            try:
                version = cf.read()[1]
            except ConfigError:
                version = None
            return self.edge.cfg, version, [f"{cf.path} is not valid now; showing the running "
                                            "configuration:", *exc.problems]
        return cfg, version, []

    def _writer(self) -> ConfigFile:
        cf = self.config_file
        if cf is None:
            raise ApiError(409, "the edge was started without a configuration file: partners "
                           "cannot be changed here")
        return cf

    def _status(self) -> dict[str, Any]:
        cfg, version, problems = self._file_state()
        return {"version": version, "problems": problems, "domains": list(self.edge.cfg.domains),
                "config_file": str(self.edge.cfg.path or ""),
                "last_reload": _reload_json(self.edge), "edge_version": __version__}

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body must be a JSON object") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    @staticmethod
    def _version(body: dict[str, Any], request: web.Request) -> str:
        version = body.get("version") or request.headers.get("If-Match", "").strip('"')
        if not isinstance(version, str) or not version:
            raise ApiError(400, "'version' is required: the file version you read (GET "
                           "/api/v1/partners returns it), so a concurrent change is not lost")
        return version

    @staticmethod
    def _fields(body: dict[str, Any], key: str) -> dict[str, Any]:
        fields = body.get(key)
        if not isinstance(fields, dict):
            raise ApiError(400, f"{key!r} is required: an object of the fields to set")
        return fields

    @staticmethod
    def _change(request: web.Request, fn: Callable[[], Any], dry: bool,
                status: int = 200) -> web.Response:
        try:
            change = fn()
        except StaleVersion as exc:
            raise ApiError(409, str(exc), current_version=exc.current) from None
        except NoSuchPartner as exc:
            raise ApiError(404, "; ".join(exc.errors), errors=exc.errors) from None
        except ConfigRejected as exc:
            raise ApiError(422, "the change was refused: " + "; ".join(exc.errors),
                           errors=exc.errors) from None
        except ConfigError as exc:
            raise ApiError(422, "; ".join(exc.problems), errors=exc.problems) from None
        if not dry:  # an audit line per change: who, what, the file's new version
            who = "a panel session" if SESSION in request else "the API token"
            log.info("admin: %s %s by %s from %s: file version now %s", request.method,
                     request.path, who, request.remote, change.version[:12])
        return web.json_response({"version": change.version, "warnings": change.warnings,
                                  "diff": change.diff}, status=status)

    # -- API -----------------------------------------------------------------------------------

    async def api_partners(self, request: web.Request) -> web.Response:
        cfg, version, problems = self._file_state()
        partners = [partner_json(p, self.edge) for p in cfg.partners]
        default = cfg.partners.default
        return web.json_response({
            "version": version, "problems": problems, "partners": partners,
            "default_partner": default.type.value if default is not None else None})

    async def api_partner(self, request: web.Request) -> web.Response:
        cfg, version, _ = self._file_state()
        domain = request.match_info["domain"].lower().rstrip(".")
        for p in cfg.partners:
            if p.domain == domain:
                return web.json_response({"version": version,
                                          "partner": partner_json(p, self.edge)})
        raise ApiError(404, f"no partner with primary domain {domain}")

    async def api_new_partner(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        fields, version = self._fields(body, "partner"), self._version(body, request)
        dry = _dry_run(request, body)
        cf = self._writer()
        return self._change(request, lambda: cf.new_partner(fields, version, dry_run=dry),
                            dry, 200 if dry else 201)

    async def api_set_partner(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        fields, version = self._fields(body, "partner"), self._version(body, request)
        domain, dry = request.match_info["domain"], _dry_run(request, body)
        cf = self._writer()
        return self._change(request, lambda: cf.set_partner(domain, fields, version,
                                                            dry_run=dry), dry)

    async def api_remove_partner(self, request: web.Request) -> web.Response:
        body = await self._body(request) if request.can_read_body else {}
        version = body.get("version") or request.query.get("version") or self._version(
            body, request)
        domain, dry = request.match_info["domain"], _dry_run(request, body)
        cf = self._writer()
        return self._change(request, lambda: cf.remove_partner(domain, version, dry_run=dry),
                            dry)

    async def api_pin(self, request: web.Request) -> web.Response:
        """Issue 15, "pin current certificate": add the key of the certificate the partner
        presented last (or the body's `pin`) to its pin_sha256, through ConfigFile like every
        partner edit; `trust` ("pin" / "ca") is set too when given."""
        body = await self._body(request)
        version, dry = self._version(body, request), _dry_run(request, body)
        cf = self._writer()
        domain = request.match_info["domain"].lower().rstrip(".")
        try:
            written = cf.partner_fields(domain)
        except NoSuchPartner as exc:
            raise ApiError(404, "; ".join(exc.errors), errors=exc.errors) from None
        given = body.get("pin")
        if given is not None:
            try:
                pin = parse_pin(given)
            except ValueError as exc:
                raise ApiError(422, f"pin: {exc}") from None
        else:
            seen = self.edge.partner_certificates.get(domain)
            if seen is None:
                raise ApiError(409, f"no certificate of {domain} has been seen yet: probe it "
                               "(or wait for a connection), or give 'pin'")
            pin = seen.spki_sha256
        pins = []
        for value in written.get("pin_sha256") or []:
            try:
                pins.append(parse_pin(value))
            except ValueError:
                pins.append(str(value))  # the file's own problem: the check names it
        fields: dict[str, Any] = {"pin_sha256": pins + ([pin] if pin not in pins else [])}
        if body.get("trust") is not None:
            fields["trust"] = body["trust"]
        return self._change(request, lambda: cf.set_partner(domain, fields, version,
                                                            dry_run=dry), dry)

    async def api_matrix(self, request: web.Request) -> web.Response:
        return web.json_response({"matrix": matrix_json()})

    async def api_streams(self, request: web.Request) -> web.Response:
        return web.json_response({"streams": self.edge.monitor.streams(),
                                  "now": self.edge.monitor.wall()})

    async def api_history_index(self, request: web.Request) -> web.Response:
        h = self.edge.monitor.history
        return web.json_response({"partners": [
            {"partner": key, "attempts": len(h.attempts(key)),
             "last": attempt_json(h.last(key)),
             "last_failure": attempt_json(h.last_failure(key))} for key in h.partners()]})

    async def api_history(self, request: web.Request) -> web.Response:
        domain = request.match_info["domain"].lower().rstrip(".")
        return web.json_response({"partner": domain, "attempts": [
            a.to_json() for a in self.edge.monitor.history.attempts(domain)]})

    def _settings(self) -> dict[str, Any]:
        cf = self.config_file
        _, version, problems = self._file_state()
        values = cf.gateway_settings() if cf is not None else {}
        return {"version": version, "problems": problems, "settings": [
            {"key": s.key, "lync": s.lync, "where": s.where, "type": s.kind.__name__,
             "default": s.default, "help": s.help,
             "value": ("(set)" if s.key == "dialback_secret" and values.get(s.key)
                       else values.get(s.key, s.default))}
            for s in GATEWAY_SETTINGS.values()]}

    async def api_settings(self, request: web.Request) -> web.Response:
        return web.json_response(self._settings())

    async def api_set_settings(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        fields, version = self._fields(body, "settings"), self._version(body, request)
        dry = _dry_run(request, body)
        cf = self._writer()
        return self._change(request, lambda: cf.set_gateway_settings(fields, version,
                                                                     dry_run=dry), dry)

    async def api_certificates(self, request: web.Request) -> web.Response:
        return web.json_response(certificates_json(self.edge.cfg, self.edge.monitor.wall()))

    async def api_probe(self, request: web.Request) -> web.Response:
        """Issue 13: probe the domain now, as `edgeproxy probe` does, from the running edge
        (its configuration, its dialback secret); the report is kept in the partner's probe
        history."""
        from .probe import Prober

        domain = request.match_info["domain"]
        try:
            prober = Prober(self.edge.cfg, domain, in_edge=True)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        report = (await prober.run()).to_json()
        self.edge.probes.record(prober.remote, report)
        presented = prober.presented()  # issue 15: the partner's current certificate
        if presented is not None:
            partner = prober.configured.domain if prober.configured is not None and \
                not prober.configured.is_default else prober.remote
            self.edge.saw_certificate(partner, presented[0], presented[1], "probe")
        log.info("admin: probe of %s by %s: %s", prober.remote, request.remote,
                 report["diagnosis"])
        return web.json_response(report)

    async def api_probes(self, request: web.Request) -> web.Response:
        domain = request.match_info["domain"].lower().rstrip(".")
        return web.json_response({"partner": domain,
                                  "probes": self.edge.probes.history(domain)})

    async def api_status(self, request: web.Request) -> web.Response:
        return web.json_response(self._status())

    # -- pages ---------------------------------------------------------------------------------

    def _render(self, name: str, request: web.Request, status: int = 200,
                **context: Any) -> web.Response:
        sid = request.get(SESSION)
        csrf = self.sessions[sid].csrf if sid in self.sessions else ""
        html = self.templates.get_template(name).render(
            csrf=csrf, page=name.removesuffix(".html"), domains=self.edge.cfg.domains,
            **context)
        return web.Response(text=html, content_type="text/html", status=status, headers={
            "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})

    async def page_partners(self, request: web.Request) -> web.Response:
        cfg, version, problems = self._file_state()
        partners = [partner_json(p, self.edge) for p in cfg.partners]
        default = cfg.partners.default
        return self._render("partners.html", request, partners=partners, version=version,
                            problems=problems, file_status=self._status(),
                            default_partner=default.type.value if default else None)

    async def page_partner_form(self, request: web.Request) -> web.Response:
        cfg, version, problems = self._file_state()
        domain = request.match_info.get("domain")
        partner: dict[str, Any] | None = None
        if domain is not None:
            domain = domain.lower().rstrip(".")
            for p in cfg.partners:
                if p.domain == domain:
                    partner = partner_json(p, self.edge)
            if partner is None:
                raise web.HTTPNotFound(text=f"no partner with primary domain {domain}")
        return self._render(
            "partner_form.html", request, partner=partner, version=version, problems=problems,
            matrix=matrix_json(), types=[t.value for t in PartnerType],
            negotiations=[n.value for n in Negotiation], trusts=[t.value for t in Trust],
            default=partner_json(Partner(domain=""), self.edge),
            partner_limit=cfg.partner_connection_limit,
            recent=self.edge.monitor.history.attempts(domain)[:5] if domain else [])

    async def page_connections(self, request: web.Request) -> web.Response:
        return self._render("connections.html", request, streams=self.edge.monitor.streams())

    async def page_history(self, request: web.Request) -> web.Response:
        h = self.edge.monitor.history
        domain = request.match_info.get("domain")
        cfg, _, _ = self._file_state()
        keys = list(dict.fromkeys([*(p.domain for p in cfg.partners), *h.partners()]))
        if domain is not None:
            domain = domain.lower().rstrip(".")
        return self._render("history.html", request, partners=[
            {"partner": k, "attempts": len(h.attempts(k)), "last": h.last(k),
             "last_failure": h.last_failure(k)} for k in keys],
            domain=domain, attempts=h.attempts(domain) if domain else [])

    async def page_settings(self, request: web.Request) -> web.Response:
        return self._render("settings.html", request, **self._settings())

    async def page_certificates(self, request: web.Request) -> web.Response:
        return self._render("certificates.html", request,
                            certs=certificates_json(self.edge.cfg, self.edge.monitor.wall()))


def _reload_json(edge: Edge) -> dict[str, Any] | None:
    r = edge.last_reload
    if r is None:
        return None
    return {"ok": r.ok, "version": r.version, "at": r.at, "errors": list(r.errors),
            "warnings": list(r.warnings), "changes": list(r.changes)}


def _dry_run(request: web.Request, body: dict[str, Any]) -> bool:
    return request.query.get("dry_run", "") in ("1", "true") or body.get("dry_run") is True


def _safe_next(target: str) -> str:
    """Only our own paths after login (no open redirect)."""
    ok = target.startswith("/") and not target.startswith("//") and "\\" not in target
    return target if ok else "/partners"


def _ago(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 60:
        return f"{s} s ago"
    if s < 3600:
        return f"{s // 60} min ago"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min ago"
    return f"{s // 86400} d ago"
