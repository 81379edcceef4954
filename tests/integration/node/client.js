"use strict";
/**
 * A load of Node socket.io-client instances, for stickyproxy's integration
 * tests.
 *
 *   node client.js URL --clients N --messages M
 *       [--transports polling|polling,websocket] [--timeout MS] [--ack-timeout MS]
 *
 * N clients connect at once; each then emits `echo` M times in a row, waiting
 * for each acknowledgement, and stops at its first failure. One JSON line is
 * printed at the end and the process exits 0, also when clients failed (the
 * line says how); it exits by itself at the latest once `--timeout` has
 * passed (or two seconds after the report, while sessions close).
 *
 * The output: {clients, messages, sent, answered, completed,
 * servers_per_client, engine_ids, final_transports, upgrade_errors, failures,
 * errors, elapsed_ms}. A client is completed when it connected, every echo
 * was answered, and all answers came from one server.
 *
 * In Node, engine.io-client keeps cookies only when `withCredentials` is true
 * (it then creates its own cookie jar); it is left false, as it is by
 * default, so no client ever returns a cookie such as the proxy's
 * `storify_editor_host`. The default XMLHttpRequest of engine.io-client in
 * Node uses no connection pool, so every polling request opens its own TCP
 * connection.
 */

const { parseArgs } = require("node:util");
const { io } = require("socket.io-client");

function options() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      clients: { type: "string", default: "6" },
      messages: { type: "string", default: "10" },
      transports: { type: "string", default: "polling" },
      timeout: { type: "string", default: "20000" },
      "ack-timeout": { type: "string", default: "5000" },
    },
  });
  if (positionals.length !== 1) {
    process.stderr.write("usage: node client.js URL --clients N --messages M " +
      "[--transports polling|polling,websocket] [--timeout MS] [--ack-timeout MS]\n");
    process.exit(2);
  }
  return {
    url: positionals[0],
    clients: Number(values.clients),
    messages: Number(values.messages),
    transports: values.transports.split(","),
    timeout: Number(values.timeout),
    ackTimeout: Number(values["ack-timeout"]),
  };
}

/** What one client saw. */
function newOutcome(index) {
  return {
    index,
    connected: false,
    sent: 0,
    answered: 0,
    servers: new Set(),
    engineId: null,
    finalTransport: null,
    upgradeErrors: 0,
    error: null,
  };
}

function isCompleted(outcome, messages) {
  return outcome.connected && outcome.error === null && outcome.sent === messages &&
    outcome.answered === messages && outcome.servers.size === 1;
}

/** Connect, echo `messages` times, disconnect; every failure ends up in `outcome.error`. */
function runClient(outcome, opts) {
  return new Promise((resolve) => {
    const socket = io(opts.url, {
      forceNew: true,
      reconnection: false,
      transports: opts.transports,
      withCredentials: false,
      timeout: opts.ackTimeout,
    });
    const engine = socket.io.engine;
    // A misrouted upgrade fails quietly: the client stays on polling.
    engine.on("upgradeError", () => { outcome.upgradeErrors += 1; });
    let finished = false;
    const finish = (error) => {
      if (finished) return;
      finished = true;
      if (error && outcome.error === null) outcome.error = error;
      outcome.engineId = engine.id || null;
      outcome.finalTransport = engine.transport ? engine.transport.name : null;
      socket.disconnect();
      resolve();
    };

    socket.on("connect_error", (err) => finish(`connect: ${err.message}`));
    socket.on("disconnect", (reason) => finish(`disconnected: ${reason}`));
    socket.on("connect", async () => {
      outcome.connected = true;
      for (let i = 0; i < opts.messages && !finished; i += 1) {
        outcome.sent += 1;
        let reply;
        try {
          reply = await socket.timeout(opts.ackTimeout).emitWithAck("echo", i);
        } catch (err) {
          finish(`echo ${i}: ${err.message}`);
          return;
        }
        if (!reply || reply.data !== i) {
          finish(`echo ${i}: unexpected answer ${JSON.stringify(reply)}`);
          return;
        }
        outcome.answered += 1;
        outcome.servers.add(String(reply.server));
      }
      // With an upgrade, let it finish before reading the final transport:
      // the probe starts only after the handshake, in parallel with polling.
      const pending = opts.transports.includes("websocket") &&
        engine.transport.name !== "websocket" && outcome.upgradeErrors === 0;
      if (pending && !finished) {
        await new Promise((resolveWait) => {
          const timer = setTimeout(done, opts.ackTimeout);
          function done() {
            clearTimeout(timer);
            resolveWait();
          }
          engine.once("upgrade", done);
          engine.once("upgradeError", done);
        });
      }
      finish(null);
    });
  });
}

function summary(outcomes, opts, started) {
  const completed = outcomes.filter((o) => isCompleted(o, opts.messages)).length;
  return {
    clients: opts.clients,
    messages: opts.messages,
    transports: opts.transports,
    sent: outcomes.reduce((n, o) => n + o.sent, 0),
    answered: outcomes.reduce((n, o) => n + o.answered, 0),
    completed,
    failures: outcomes.length - completed,
    servers_per_client: outcomes.map((o) => [...o.servers].sort()),
    engine_ids: outcomes.map((o) => o.engineId),
    final_transports: outcomes.map((o) => o.finalTransport),
    upgrade_errors: outcomes.reduce((n, o) => n + o.upgradeErrors, 0),
    errors: outcomes.filter((o) => o.error !== null).map((o) => `client ${o.index}: ${o.error}`),
    elapsed_ms: Date.now() - started,
  };
}

/** How long closing sessions may keep the process alive after the report (ms). */
const CLOSE_GRACE = 2000;

let reported = false;

/**
 * Print the result. With `linger`, the process then ends by itself once the
 * clients' last requests (a polling client's close packet, and the long poll
 * the server answers once it reads it) are done, so that sessions end on
 * their servers instead of being cut; a hard stop bounds the wait.
 */
function report(result, linger) {
  if (reported) return;
  reported = true;
  process.stdout.write(`${JSON.stringify(result)}\n`, () => {
    if (linger) {
      setTimeout(() => process.exit(0), CLOSE_GRACE).unref();
    } else {
      process.exit(0);
    }
  });
}

async function main() {
  const opts = options();
  const started = Date.now();
  const outcomes = Array.from({ length: opts.clients }, (_, index) => newOutcome(index));
  const timer = setTimeout(() => {
    for (const outcome of outcomes) {
      if (outcome.error === null && !isCompleted(outcome, opts.messages)) {
        outcome.error = "the load's time ran out";
      }
    }
    report(summary(outcomes, opts, started), false);
  }, opts.timeout);
  await Promise.all(outcomes.map((outcome) => runClient(outcome, opts)));
  clearTimeout(timer);
  report(summary(outcomes, opts, started), true);
}

main();
