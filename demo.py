"""The original MobileStyleGAN demo as a page in the browser: a generator drawing live while you move its controls.

    python demo.py                                         # the FFHQ student on http://127.0.0.1:8000
    python demo.py --model emoji --compare emoji-teacher   # the emoji student beside its teacher (offline)
    python demo.py --port 8080                             # another port (0: any free one)
    python demo.py --w out/project-me/code.pt              # start from a projection (train.py project)

The page (assets/demo.html: plain HTML and JavaScript, no build step, nothing fetched from elsewhere) shows the
image of a seed, with truncation psi, noise mode and style mixing; it redraws while a slider is dragged,
animates a smooth walk through W, shows each network's milliseconds per frame, and saves the frame as a PNG.

The server (the standard library's http.server) answers three paths:
    GET /            the page
    GET /info        the model's facts, JSON
    GET /render      one frame as a PNG; its network's time in the X-Render-Ms header. Parameters:
                     seed, psi, noise (const|random|none); optional mix (none|coarse|middle|fine) with mix_seed,
                     walk (a position on the walk through W that starts at the seed), net (student|teacher),
                     projection (1: the --w code instead of the seed), client (an id: of one client's frames,
                     only the newest is drawn)
One frame is drawn at a time. A frame of a client that sent a newer one while it waited is dropped (204), so
dragging a slider never builds a backlog. A bad or missing parameter is a 400 with a one-line reason, an unknown
path a 404, a request body or method the server has no use for a 4xx; nothing the client sends ever becomes a
file path. The server binds to 127.0.0.1 unless --host says otherwise, and then answers anyone who can reach it.
"""
import argparse
import collections
import http
import http.server
import ipaddress
import json
import math
import os
import socket
import sys
import threading
import time
import urllib.parse

import torch

import formats
import msgan
import ops
from sample import MIX_SLOTS, compare_inputs, int_in, mix_styles, seeded_inputs, to_uint8

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo.html")
DEFAULT_PORT = 8000
SEED_MAX = 2**32 - 1      # the page draws random seeds below 2**32 (JavaScript numbers are exact there)
PSI_RANGE = (-1.0, 2.0)   # truncation psi; the page's slider spans it
WALK_MAX = 1e6            # positions on the walk through W: keys passed, one per seed
CLIENT_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
MAX_CLIENT_ID = 64        # characters
MAX_CLIENTS = 1024        # clients whose newest frame is remembered
MAX_WAITING = 16          # frames waiting for the renderer at once; more get 429
MAX_BODY = 16 * 2**20     # request bodies are never used: up to this many bytes are read and dropped, larger is 413
SOCKET_TIMEOUT_S = 30     # an idle or stalled connection is closed after this


class BadRequest(Exception):
    """A request this server will not answer with content: an HTTP status and a one-line reason."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status, self.reason = status, reason


# ----------------------------------------------------------------------------------------------
# Frames


def choice(*names):
    def parse(text):
        if text not in names:
            raise ValueError(f"must be {' or '.join(names)}")
        return text
    return parse


def integer(lo, hi):
    def parse(text):
        if not (text.isascii() and text.isdigit() and len(text) <= len(str(hi)) and lo <= int(text) <= hi):
            raise ValueError(f"must be an integer in {lo}..{hi}")
        return int(text)
    return parse


def number(lo, hi):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not lo <= value <= hi:  # NaN fails too
            raise ValueError(f"must be a number in {lo:g}..{hi:g}")
        return value
    return parse


def client_id(text):
    if not (len(text) <= MAX_CLIENT_ID and set(text) <= CLIENT_ID_CHARS):
        raise ValueError(f"must be up to {MAX_CLIENT_ID} letters, digits, '-' or '_'")
    return text


REQUIRED = object()
FRAME_PARAMETERS = {  # name -> (parser, default)
    "seed": (integer(0, SEED_MAX), REQUIRED),
    "psi": (number(*PSI_RANGE), REQUIRED),
    "noise": (choice("const", "random", "none"), REQUIRED),
    "mix": (choice("none", *MIX_SLOTS), "none"),
    "mix_seed": (integer(0, SEED_MAX), 0),
    "walk": (number(0, WALK_MAX), 0.0),
    "net": (choice("student", "teacher"), "student"),
    "projection": (choice("0", "1"), "0"),
    "client": (client_id, ""),
}


def frame_parameters(query):
    """The parameters of a /render query string, each checked; BadRequest (400) names the first bad one."""
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    names = [name for name, _ in pairs]
    params = {}
    for name, value in pairs:
        if name not in FRAME_PARAMETERS:
            raise BadRequest(400, f"unknown parameter {name[:40]!r} (known: {', '.join(FRAME_PARAMETERS)})")
        if names.count(name) > 1:
            raise BadRequest(400, f"parameter {name!r} given more than once")
        try:
            params[name] = FRAME_PARAMETERS[name][0](value)
        except ValueError as e:
            raise BadRequest(400, f"parameter {name!r} is {value[:40]!r}: it {e}") from None
    for name, (_, default) in FRAME_PARAMETERS.items():
        if name not in params:
            if default is REQUIRED:
                raise BadRequest(400, f"missing parameter {name!r}")
            params[name] = default
    return params


def catmull_rom(p0, p1, p2, p3, t):
    """The point at t in [0, 1] of the cubic through p1 (t = 0) and p2 (t = 1) whose tangents point from p0 to p2
    and from p1 to p3: a path through every key with no stop at any."""
    return 0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (3 * (p1 - p2) + p3 - p0) * t**3)


class Renderer:
    """The student (folded: the inference path) and, with --compare, a teacher drawn from the same W+ and noise."""

    def __init__(self, G, teacher=None, name="", teacher_name="", code=None):
        if teacher is not None and (teacher.z_dim, teacher.w_dim, teacher.num_ws) != (G.z_dim, G.w_dim, G.num_ws):
            raise ValueError(f"--compare {teacher_name}: its z_dim, w_dim and num_ws differ from {name}'s: not the "
                             "same W+ space")
        self.G, self.teacher = G.fold().requires_grad_(False), teacher
        msgan.tune_tiling(self.G, log=lambda text: print(f"demo.py: {text}", file=sys.stderr))  # once per machine
        self.device = G.w_avg.device
        self.name, self.teacher_name, self.code = name, teacher_name, code

    def info(self):
        nets = {"student": self.G} if self.teacher is None else {"student": self.G, "teacher": self.teacher}
        return {"model": self.name, "teacher": self.teacher_name or None, "resolution": self.G.img_resolution,
                "num_ws": self.G.num_ws, "networks": {name: "MobileStyleGAN student" if net.is_student else
                                                      "StyleGAN2 teacher" for name, net in nets.items()},
                "mix_slots": {group: [min(first, self.G.num_ws), min(last or self.G.num_ws, self.G.num_ws)]
                              for group, (first, last) in MIX_SLOTS.items()},
                "seed_max": SEED_MAX, "psi_range": PSI_RANGE, "projection": self.code is not None}

    def w(self, seed):
        z, _ = seeded_inputs(self.G, [seed % (SEED_MAX + 1)], "const", self.device)
        return self.G.mapping(z)                                                    # [1, w_dim]

    @torch.no_grad()
    def frame_inputs(self, p):
        """(ws [1, num_ws, w_dim], noise) of a frame: the seed's w, or the point `walk` on a smooth path through the
        w of seed, seed + 1, ..., or the projection's code; truncated, with the mix seed's w in the mixed group's
        slots."""
        k, t = divmod(p["walk"], 1.0)
        if p["projection"] == "1":
            if self.code is None:
                raise BadRequest(400, "no projection: start demo.py with --w CODE")
            ws = self.code["ws"].to(self.device)
        elif p["walk"]:
            ws = catmull_rom(*(self.w(p["seed"] + int(k) + i) for i in (-1, 0, 1, 2)), t)[:, None]
        else:
            ws = self.w(p["seed"])[:, None]
        ws = ws.expand(1, self.G.num_ws, -1)
        if p["mix"] != "none":
            ws = mix_styles(ws, self.w(p["mix_seed"]), p["mix"])
        _, noise = compare_inputs(self.G, self.teacher, [p["seed"]], p["noise"], self.device)
        if p["projection"] == "1" and self.code["noise"] is not None:
            noise = [n.to(self.device) for n in self.code["noise"]]
        return self.G.truncate(ws, p["psi"]), noise

    @torch.no_grad()
    def render(self, p):
        """(PNG bytes, milliseconds the network took) of one frame."""
        if p["net"] == "teacher" and self.teacher is None:
            raise BadRequest(400, "no teacher: start demo.py with --compare TEACHER")
        if p["net"] == "teacher" and p["projection"] == "1" and self.code["noise"] is not None:
            raise BadRequest(400, "the projection's noise maps are the student's: the teacher cannot draw them")
        G = self.teacher if p["net"] == "teacher" else self.G
        ws, noise = self.frame_inputs(p)
        start = time.perf_counter()
        img = G.synthesis(ws, noise=noise, noise_mode=p["noise"]).float()  # float32 from --bf16 too
        if img.is_cuda:
            torch.cuda.synchronize()
        milliseconds = (time.perf_counter() - start) * 1000
        return formats.encode_png(to_uint8(img)[0]), milliseconds


# ----------------------------------------------------------------------------------------------
# The server


class Newest:
    """The stamp of the newest frame request of each (client, network), for the last MAX_CLIENTS clients."""

    def __init__(self):
        self.lock = threading.Lock()
        self.count = 0
        self.stamps = collections.OrderedDict()

    def stamp(self, key):
        with self.lock:
            self.count += 1
            self.stamps[key] = self.count
            self.stamps.move_to_end(key)
            if len(self.stamps) > MAX_CLIENTS:
                self.stamps.popitem(last=False)
            return self.count

    def is_newest(self, key, stamp):
        with self.lock:
            return self.stamps.get(key, stamp) == stamp


class DemoServer(http.server.ThreadingHTTPServer):
    daemon_threads = True     # Ctrl-C does not wait for idle keep-alive connections
    request_queue_size = 128  # connections the kernel holds before one is accepted

    def __init__(self, address, renderer, page):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, Handler)
        self.renderer, self.page = renderer, page
        self.render_lock = threading.Lock()
        self.waiting = threading.BoundedSemaphore(MAX_WAITING)
        self.newest = Newest()
        host, port = self.server_address[:2]
        # bound to loopback, answer only requests addressed to it: a web page elsewhere cannot reach the server
        # through a domain name that resolves to 127.0.0.1 (DNS rebinding)
        self.hosts = ({f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"}
                      if ipaddress.ip_address(host).is_loopback else None)

    @property
    def url(self):
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def handle_error(self, request, client_address):
        """A connection that broke (the client went away mid-answer): one line, never a traceback."""
        error = sys.exc_info()[1]
        print(f"demo.py: {client_address[0]}: {type(error).__name__}: {error}", file=sys.stderr)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the page's frames share one connection
    server_version = "msgan-demo"
    timeout = SOCKET_TIMEOUT_S

    def setup(self):
        super().setup()
        # headers and body go out as two writes: without this, Nagle's algorithm holds the body back until the
        # client acknowledges the headers, which it delays by up to 40 ms, every frame
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self):
        try:
            self.drop_body()
            host = self.headers.get("Host")
            if self.server.hosts is not None and host is not None and host not in self.server.hosts:
                raise BadRequest(400, f"this server answers requests to {self.server.url} only")
            url = urllib.parse.urlsplit(self.path)
            if url.path == "/":
                self.reply(200, "text/html; charset=utf-8", self.server.page)
            elif url.path == "/info":
                self.reply(200, "application/json", json.dumps(self.server.renderer.info()).encode())
            elif url.path == "/render":
                self.render(frame_parameters(url.query))
            else:
                raise BadRequest(404, f"no such page: {url.path[:100]}")
        except BadRequest as e:
            self.send_error(e.status, e.reason)
        except Exception as e:  # a frame that failed for another reason: answered, and one line in the log
            print(f"demo.py: {self.path[:100]}: {type(e).__name__}: {e}", file=sys.stderr)
            self.send_error(400, f"could not render this frame ({type(e).__name__})")

    def do_POST(self):
        try:
            self.drop_body()
            self.send_error(405, "this server only answers GET")
        except BadRequest as e:
            self.send_error(e.status, e.reason)

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_POST

    def render(self, params):
        server, client = self.server, params["client"]
        key = (client, params["net"])
        stamp = server.newest.stamp(key) if client else None
        if not server.waiting.acquire(blocking=False):
            raise BadRequest(429, "busy: too many frames waiting to be drawn")
        try:
            with server.render_lock:
                if stamp is not None and not server.newest.is_newest(key, stamp):
                    self.reply(204, None, b"", {"X-Dropped": "a newer frame of this client came"})
                    return
                png, milliseconds = server.renderer.render(params)
        finally:
            server.waiting.release()
        self.reply(200, "image/png", png, {"X-Render-Ms": f"{milliseconds:.1f}"})

    def drop_body(self):
        """Read and drop a request body (no request here has a use for one), so that its sender gets the answer."""
        length = self.headers.get("Content-Length", "0")
        if not (length.isascii() and length.isdigit()):
            raise BadRequest(400, "Content-Length is not a number")
        if int(length) > MAX_BODY:
            self.close_connection = True
            raise BadRequest(413, f"request body of {int(length)} bytes: this server reads no more than {MAX_BODY}")
        remaining = int(length)
        while remaining:
            chunk = self.rfile.read(min(remaining, 2**16))
            if not chunk:
                raise BadRequest(400, "request body shorter than its Content-Length")
            remaining -= len(chunk)

    def reply(self, status, content_type, body, headers=None):
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            try:
                self.wfile.write(body)
            except ConnectionError:  # the client went away (a closed tab, a newer frame): nothing to tell anyone
                self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        """Every error as one line of text. The standard library's own calls included: it answers an unknown
        method with 501 and an unknown HTTP version with 505, both the client's doing: here 405 and 400."""
        code = 405 if code == 501 else 400 if code >= 500 else code
        reason = (message or http.HTTPStatus(code).phrase).replace("\n", " ")
        self.close_connection = True  # whatever the client sent next may belong to the failed request
        try:
            self.reply(code, "text/plain; charset=utf-8", f"error: {reason}\n".encode())
        except ConnectionError:  # the client went away before the headers
            pass

    def log_message(self, format, *args):
        """Quiet: a frame per slider move would flood the terminal; errors are printed where they happen."""


# ----------------------------------------------------------------------------------------------
# Command line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ffhq", help="pretrained name or checkpoint path, as for msgan.load "
                        "(default ffhq)")
    parser.add_argument("--compare", metavar="TEACHER", help="also draw this file's StyleGAN2 teacher, beside the "
                        "student, from the same w and noise")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this "
                        "machine only; 0.0.0.0 serves everyone who can reach it, without authentication)")
    parser.add_argument("--port", type=int_in(0, 65535), default=DEFAULT_PORT, help="port (default 8000; 0: any "
                        "free one)")
    parser.add_argument("--w", metavar="CODE", help="a projection (train.py project) the page can start from")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="the student in bfloat16 where the hardware has it "
                        "(AVX512-BF16 or AMX CPUs, GPUs): faster frames; elsewhere a warning")
    args = parser.parse_args(argv)
    try:
        ipaddress.ip_address(args.host)
        torch.empty(0, device=args.device)
    except ValueError:
        parser.error(f"--host {args.host!r}: not an IP address (e.g. 127.0.0.1, 0.0.0.0, ::1)")
    except (RuntimeError, AssertionError) as e:
        parser.error(f"--device {args.device}: {str(e).splitlines()[0]}")
    ops.use_huge_pages()
    try:
        server = start(args)
        print(f"demo.py: {args.model} ({server.renderer.G.img_resolution}x{server.renderer.G.img_resolution})"
              f"{f' beside {args.compare}' if args.compare else ''} at {server.url} (Ctrl-C stops)", flush=True)
        with server:
            server.serve_forever()
    except (msgan.CheckpointError, msgan.DownloadError, ValueError, OSError) as e:
        print(f"demo.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo.py: stopped", file=sys.stderr, flush=True)
        # Exit at once, as the server holds nothing to save: the handler threads are daemons that may be inside
        # torch, and the interpreter's normal exit, with them still there, aborts the process
        os._exit(0)
    return 0


def start(args):
    """The server of the command line's model, its first frames drawn (the first call of a network is slow)."""
    G = msgan.load(args.model, device=args.device).fold()  # folded in float32, then maybe bfloat16
    G.synthesis = ops.maybe_bfloat16(G.synthesis, args.bf16, lambda text: print(f"demo.py: {text}", file=sys.stderr))
    teacher = msgan.load(args.compare, device=args.device, part="teacher") if args.compare else None
    code = args.w and formats.read_projection(args.w, G.num_ws, G.w_dim, G.synthesis.noise_resolutions)
    renderer = Renderer(G, teacher, os.path.basename(str(args.model)),
                        os.path.basename(str(args.compare)) if args.compare else "", code)
    for net in ("student", "teacher") if teacher is not None else ("student",):
        renderer.render(frame_parameters(f"seed=0&psi=1&noise=const&net={net}"))
    with open(PAGE, "rb") as f:
        return DemoServer((args.host, args.port), renderer, f.read())


if __name__ == "__main__":
    sys.exit(main())
