"use strict";
/**
 * A socket.io backend on Node's reference implementation, for stickyproxy's
 * integration tests.
 *
 *   node server.js --name s1 --ready-file PATH
 *       [--ping-interval MS] [--ping-timeout MS] [--eio3]
 *
 * An http server on 127.0.0.1, on a port the OS picks, with socket.io
 * attached. The port is written to PATH (renamed into place, so a reader
 * never sees half of it) once the server listens.
 *
 * - event `echo`: acknowledged with {server: NAME, data: DATA};
 * - GET /status (any query, e.g. `/status?all=1`): `200 ok`, the health check;
 * - GET /whoami: the server's name;
 * - GET /unknown-sessions: JSON {server, total, by_kind, stale, requests,
 *   cookie_requests, persistence_cookie_requests}.
 *
 * `total` counts the requests engine.io refused with code 1 ("Session ID
 * unknown") for a sid this server never issued: misrouted requests. `stale`
 * counts refusals of sids this server did issue, whose session had ended.
 * `requests` counts every HTTP request and upgrade but those for this report;
 * `cookie_requests` those
 * that carried a Cookie header at all, `persistence_cookie_requests` those
 * whose Cookie header named `storify_editor_host`. A proxy configured with
 * `indirect = false` forwards the persistence cookie untouched, so a zero
 * here means the clients never sent it back.
 *
 * engine.io sets no `io` cookie (`cookie: false`), so any stickiness must come
 * from the proxy in front. `--eio3` sets `allowEIO3: true`, so that a client
 * speaking engine.io protocol 3 (socket.io 2) can connect.
 */

const fs = require("node:fs");
const http = require("node:http");
const path = require("node:path");
const { parseArgs } = require("node:util");
const { Server } = require("socket.io");

/** The persistence cookie of the proxy in front (HAProxy's `cookie` name). */
const PERSISTENCE_COOKIE = "storify_editor_host";

/** engine.io's error code for a request whose sid it does not hold. */
const UNKNOWN_SID = 1;

function options() {
  const { values } = parseArgs({
    options: {
      name: { type: "string" },
      "ready-file": { type: "string" },
      "ping-interval": { type: "string", default: "25000" },
      "ping-timeout": { type: "string", default: "20000" },
      eio3: { type: "boolean", default: false },
    },
  });
  if (!values.name || !values["ready-file"]) {
    process.stderr.write("usage: node server.js --name NAME --ready-file PATH " +
      "[--ping-interval MS] [--ping-timeout MS] [--eio3]\n");
    process.exit(2);
  }
  return {
    name: values.name,
    readyFile: values["ready-file"],
    pingInterval: Number(values["ping-interval"]),
    pingTimeout: Number(values["ping-timeout"]),
    eio3: values.eio3,
  };
}

/** Whether a Cookie header (RFC 6265 section 5.4: `name=value; name=value`) names `wanted`. */
function namesCookie(header, wanted) {
  return header
    .split(";")
    .some((pair) => pair.trim().split("=", 1)[0].trim() === wanted);
}

/** The kind of engine.io request, as the python backends of the suite count them. */
function requestKind(req) {
  const query = new URL(req.url, "http://backend.invalid").searchParams;
  if (query.get("transport") === "websocket") return "upgrade";
  return req.method === "POST" ? "polling-post" : "polling-get";
}

function main() {
  const opts = options();
  const counts = {
    unknown: { "polling-get": 0, "polling-post": 0, upgrade: 0 },
    stale: 0,
    requests: 0,
    cookieRequests: 0,
    persistenceCookieRequests: 0,
  };
  // Every engine.io sid handed out; a test backend lives for seconds.
  const issued = new Set();

  const server = http.createServer((req, res) => {
    const url = new URL(req.url, "http://backend.invalid");
    if (req.method === "GET" && url.pathname === "/status") {
      res.writeHead(200, { "Content-Type": "text/plain" }).end("ok");
    } else if (req.method === "GET" && url.pathname === "/whoami") {
      res.writeHead(200, { "Content-Type": "text/plain" }).end(opts.name);
    } else if (req.method === "GET" && url.pathname === "/unknown-sessions") {
      const byKind = { ...counts.unknown };
      const report = {
        server: opts.name,
        total: Object.values(byKind).reduce((a, b) => a + b, 0),
        by_kind: byKind,
        stale: counts.stale,
        requests: counts.requests,
        cookie_requests: counts.cookieRequests,
        persistence_cookie_requests: counts.persistenceCookieRequests,
      };
      res.writeHead(200, { "Content-Type": "application/json" }).end(JSON.stringify(report));
    } else {
      res.writeHead(404, { "Content-Type": "text/plain" }).end("not found");
    }
  });

  const io = new Server(server, {
    cors: { origin: "*" },
    cookie: false,
    pingInterval: opts.pingInterval,
    pingTimeout: opts.pingTimeout,
    allowEIO3: opts.eio3,
  });

  // socket.io takes over the server's "request" and "upgrade" listeners when
  // it attaches; a listener prepended afterwards still sees every request
  // first, engine.io's included.
  const countRequest = (req) => {
    // The report itself is left out, so that reading it changes nothing.
    if (new URL(req.url, "http://backend.invalid").pathname === "/unknown-sessions") return;
    counts.requests += 1;
    const cookie = req.headers.cookie;
    if (cookie !== undefined) {
      counts.cookieRequests += 1;
      if (namesCookie(cookie, PERSISTENCE_COOKIE)) {
        counts.persistenceCookieRequests += 1;
        console.log(`${req.method} ${new URL(req.url, "http://backend.invalid").pathname} ` +
          `carried the ${PERSISTENCE_COOKIE} cookie`);
      }
    }
  };
  server.prependListener("request", countRequest);
  server.prependListener("upgrade", countRequest);

  io.engine.on("connection", (socket) => issued.add(socket.id));
  io.engine.on("connection_error", (err) => {
    if (err.code !== UNKNOWN_SID) return;
    const sid = err.context && err.context.sid;
    if (issued.has(sid)) {
      counts.stale += 1;
    } else {
      counts.unknown[requestKind(err.req)] += 1;
    }
  });

  io.on("connection", (socket) => {
    socket.on("echo", (data, ack) => {
      if (typeof ack === "function") ack({ server: opts.name, data });
    });
  });

  server.listen(0, "127.0.0.1", () => {
    const partial = `${opts.readyFile}.partial`;
    fs.writeFileSync(partial, String(server.address().port));
    fs.renameSync(partial, opts.readyFile);
    console.log(`${opts.name} listening on 127.0.0.1:${server.address().port} ` +
      `(${path.basename(__filename)}, eio3=${opts.eio3})`);
  });

  // Held long polls must not delay a stop: leave at once.
  for (const signal of ["SIGTERM", "SIGINT"]) {
    process.on(signal, () => process.exit(0));
  }
}

main();
