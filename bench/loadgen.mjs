// The load generator for make bench: many WebSocket clients in one Node process.
//
// Usage: node loadgen.mjs '<json config>'
//   {"target": "signal" | "floor" | "floor-jwt" | "peerjs", "port": 8080, "scenario": "S1".."S5",
//    "secret": "...", "seconds": 10, "warmup": 1, ...scenario parameters}
//   "ports": [p1, p2] instead of "port" spreads each room's members over nodes (signal only);
//   "drain_ms" (default 3000): how long to wait for in-flight messages at the end.
//   Scenario "failover" (bench/failover.py): clients spread over "ports"; on "kill <node index>"
//   on stdin, that node's clients reconnect to the others (see failover() below).
//
// Prints JSON lines on stdout: {"phase": "window_start"}, {"phase": "window_end"}
// (so the orchestrator can read the server's CPU and memory at those moments),
// then {"phase": "result", ...}. Every delivered message carries its send time
// and sequence number; a sample of envelopes is checked in full, and losses,
// duplicates and reordering are counted: a fast wrong answer is a failure.

import { createHmac } from "node:crypto";
import net from "node:net";
import { performance } from "node:perf_hooks";
import WebSocket from "ws";

const config = JSON.parse(process.argv[2]);
const SAMPLE_EVERY = 64; // full JSON.parse + envelope check on one delivery in 64
// ~1 KB of SDP, written as it appears inside a JSON string (CRLF escaped).
const SDP = "v=0\\r\\no=- 4611731400430051336 2 IN IP4 127.0.0.1\\r\\ns=-\\r\\nt=0 0\\r\\n" +
  "a=candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host\\r\\n".repeat(15);

const T_WIDTH = 14;
const SEQ_WIDTH = 10;
const SEND_OPTIONS = { binary: false, compress: false };
const emit = (value) => process.stdout.write(JSON.stringify(value) + "\n");
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const now = () => performance.now();

// ------------------------------------------------------------------ tokens

const b64url = (data) => Buffer.from(data).toString("base64url");
const HEADER = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
function jwt(sub) {
  const body = b64url(JSON.stringify({ sub, exp: Math.floor(Date.now() / 1000) + 3600 }));
  const signature = createHmac("sha256", config.secret).update(`${HEADER}.${body}`).digest("base64url");
  return `${HEADER}.${body}.${signature}`;
}

// ----------------------------------------------------------------- targets
// Each target says how to connect, how to recognise "joined", and how to
// write a targeted or room-wide message in its own protocol.

// "ports" (the cluster benchmarks): member m of every room connects to
// ports[m % ports.length], so the two sides of a pair sit on different nodes.
const portFor = (user) =>
  config.ports ? config.ports[Number(user.slice(user.indexOf("x") + 1)) % config.ports.length] : config.port;

const TARGETS = {
  signal: {
    url: (room, user) => `ws://127.0.0.1:${portFor(user)}/webrtc/ws/${room}?token=${jwt(user)}`,
    joined: (text) => text.startsWith('{"type":"room_state"'),
    message: (to, fields) =>
      `{"type":"offer","payload":{"type":"offer","sdp":"${SDP}"${to ? `,"target_user_id":"${to}"` : ""},${fields}}}`,
    roomWide: true,
  },
  floor: {
    url: (room, user) => `ws://127.0.0.1:${config.port}/ws/${room}?id=${user}`,
    joined: (text) => text.startsWith('{"type":"room_state"'),
    message: (to, fields) =>
      `{"type":"offer","payload":{"type":"offer","sdp":"${SDP}"${to ? `,"target_user_id":"${to}"` : ""},${fields}}}`,
    roomWide: true,
  },
  peerjs: {
    url: (room, user) => `ws://127.0.0.1:${config.port}/peerjs?key=peerjs&id=${user}&token=t${user}`,
    joined: (text) => text.startsWith('{"type":"OPEN"'),
    message: (to, fields) => `{"type":"OFFER","dst":"${to}","payload":{"type":"offer","sdp":"${SDP}",${fields}}}`,
    roomWide: false, // no rooms: the client fans out itself
  },
};
TARGETS["floor-jwt"] = { ...TARGETS.floor, url: (room, user) => `${TARGETS.signal.url(room, user).replace("/webrtc/ws/", "/ws/")}` };
const target = TARGETS[config.target];

// ----------------------------------------------------------- the clients

class Client {
  constructor(index, room, name) {
    this.index = index;
    this.room = room;
    this.name = name;
    this.peers = []; // other clients in the room
    this.seq = 0;
    this.inFlight = 0;
    this.lastSeqFrom = new Map(); // sender index -> last seq seen (order check)
    this.templates = new Map();
  }

  open(onMessage) {
    return new Promise((resolve, reject) => {
      const started = now();
      const ws = new WebSocket(target.url(this.room, this.name), {
        perMessageDeflate: false,
        skipUTF8Validation: true, // the server's JSON is checked on the sampled envelopes
        allowSynchronousEvents: true, // several messages per tick when they arrive together
      });
      this.ws = ws;
      let joined = false;
      ws.on("message", (data) => {
        if (!joined) {
          if (target.joined(data.toString())) {
            joined = true;
            resolve(now() - started);
          }
          return;
        }
        onMessage(this, data);
      });
      ws.on("error", (error) => (joined ? stats.errors.push(String(error)) : reject(error)));
      ws.on("close", (code) => {
        if (!joined) reject(new Error(`closed ${code} before joining`));
        else if (!stopping) stats.errors.push(`closed ${code}`);
      });
    });
  }

  /** The connection scenarios: a bare TCP upgrade, cheap enough to out-run the servers. */
  openRaw() {
    return new Promise((resolve, reject) => {
      const started = now();
      const socket = net.connect(config.port, "127.0.0.1");
      this.socket = socket;
      let received = Buffer.alloc(0);
      socket.setNoDelay(true);
      socket.on("connect", () => socket.write(this.request));
      socket.on("error", reject);
      socket.on("close", () => !this.joined && reject(new Error("closed before joining")));
      socket.on("data", (chunk) => {
        if (this.joined) {
          // Later frames (user_joined...) are not needed; pings are answered when asked to,
          // as a real idle client does (the server's keepalive drops a silent one).
          if (config.answer_pings) this.answerPings(chunk);
          return;
        }
        received = Buffer.concat([received, chunk]);
        const headerEnd = received.indexOf("\r\n\r\n");
        if (headerEnd < 0) return;
        if (!received.subarray(0, 12).toString().startsWith("HTTP/1.1 101")) {
          reject(new Error(received.subarray(0, 40).toString()));
          return;
        }
        const frame = received.subarray(headerEnd + 4);
        if (frame.length < 2) return;
        const short = frame[1] & 0x7f;
        const offset = short === 126 ? 4 : short === 127 ? 10 : 2;
        const length = short < 126 ? short : frame.length >= 4 ? frame.readUInt16BE(2) : Infinity;
        const wanted = Math.min(length, 40);
        if (frame.length < offset + wanted) return;
        if (!target.joined(frame.subarray(offset, offset + wanted).toString())) {
          reject(new Error(`unexpected first frame ${frame.subarray(offset, offset + 60)}`));
          return;
        }
        this.joined = true;
        this.unread = Buffer.alloc(0);
        if (config.answer_pings) this.answerPings(frame);
        resolve(now() - started);
      });
    });
  }

  /** Read the server's (unmasked) frames in `chunk` and answer each ping with a masked pong. */
  answerPings(chunk) {
    let data = Buffer.concat([this.unread, chunk]);
    for (;;) {
      if (data.length < 2) break;
      const short = data[1] & 0x7f;
      const offset = short === 126 ? 4 : short === 127 ? 10 : 2;
      if (data.length < offset) break;
      const length = short < 126 ? short : short === 126 ? data.readUInt16BE(2) : Number(data.readBigUInt64BE(2));
      if (data.length < offset + length) break;
      if ((data[0] & 0x0f) === 0x9) {
        const payload = data.subarray(offset, offset + length); // a zero mask leaves it as it is
        this.socket.write(Buffer.concat([Buffer.from([0x8a, 0x80 | length, 0, 0, 0, 0]), payload]));
      }
      data = data.subarray(offset + length);
    }
    this.unread = Buffer.from(data);
  }

  send(to) {
    this.seq += 1;
    // One buffer per destination, built once; only the fixed-width numbers
    // change (padded with spaces, which JSON allows), so a send copies no text.
    const key = to ? to.name : "";
    let template = this.templates.get(key);
    if (!template) {
      const fields = `"t":${" ".repeat(T_WIDTH)},"s":${String(this.index).padStart(8)},"seq":${" ".repeat(SEQ_WIDTH)}`;
      const buffer = Buffer.from(target.message(to ? to.name : null, fields));
      template = { buffer, t: buffer.lastIndexOf('"t":') + 4, seq: buffer.lastIndexOf('"seq":') + 6 };
      this.templates.set(key, template);
    }
    template.buffer.write(now().toFixed(3).padStart(T_WIDTH), template.t, "latin1");
    template.buffer.write(String(this.seq).padStart(SEQ_WIDTH), template.seq, "latin1");
    // Cork until the end of this tick: the sends a burst of deliveries
    // triggers leave in one write, so the generator stays ahead of the server.
    const socket = this.ws._socket;
    if (!socket.writableCorked) {
      socket.cork();
      process.nextTick(() => socket.uncork());
    }
    this.ws.send(template.buffer, SEND_OPTIONS);
    stats.sent += 1;
    return this.seq;
  }
}

const stats = {
  sent: 0,
  delivered: 0,
  inWindow: 0,
  latencies: [],
  checked: 0,
  badEnvelopes: [],
  misordered: 0,
  errors: [],
};
let measuring = false;
let stopping = false;

function tail(data, key) {
  const at = data.lastIndexOf(key);
  return at < 0 ? NaN : parseFloat(data.toString("latin1", at + key.length, at + key.length + 20));
}

function checkEnvelope(receiver, sender, data) {
  stats.checked += 1;
  const message = JSON.parse(data.toString());
  const problems = [];
  if (config.target === "peerjs") {
    if (message.src !== sender.name) problems.push(`src ${message.src}`);
    if (message.dst !== receiver.name) problems.push(`dst ${message.dst}`);
  } else {
    if (message.type !== "offer") problems.push(`type ${message.type}`);
    if (message.sender_id !== sender.name) problems.push(`sender_id ${message.sender_id}`);
    if (message.payload.sender_id !== sender.name) problems.push(`payload.sender_id ${message.payload.sender_id}`);
    if (message.room_id !== receiver.room) problems.push(`room_id ${message.room_id}`);
    const stamped = Date.parse(message.timestamp);
    if (!/Z$/.test(message.timestamp) || !(Math.abs(stamped - Date.now()) < 5000)) {
      problems.push(`timestamp ${message.timestamp}`);
    }
  }
  if (message.payload.sdp !== SDP.replaceAll("\\r\\n", "\r\n")) problems.push("sdp altered");
  if (problems.length && stats.badEnvelopes.length < 5) stats.badEnvelopes.push(problems.join(", "));
}

const RELAYED_PREFIX = Buffer.from(config.target === "peerjs" ? '{"type":"OFFER"' : '{"type":"offer"');

function onDelivery(receiver, data, afterDelivery) {
  if (data.compare(RELAYED_PREFIX, 0, RELAYED_PREFIX.length, 0, RELAYED_PREFIX.length) !== 0) {
    const text = data.toString();
    if (text.includes('"error"') || text.includes('"ERROR"')) stats.errors.push(text.slice(0, 200));
    return; // user_joined and the like
  }
  const sentAt = tail(data, '"t":');
  const senderIndex = tail(data, '"s":');
  const seq = tail(data, '"seq":');
  const sender = clients[senderIndex];
  stats.delivered += 1;
  const last = receiver.lastSeqFrom.get(senderIndex) ?? 0;
  if (seq <= last) stats.misordered += 1;
  receiver.lastSeqFrom.set(senderIndex, seq);
  if (measuring) {
    stats.inWindow += 1;
    stats.latencies.push(now() - sentAt);
  }
  if (stats.delivered % SAMPLE_EVERY === 0) checkEnvelope(receiver, sender, data);
  afterDelivery?.(sender, seq);
}

// -------------------------------------------------------------- scenarios

let clients = [];

async function connectAll(rooms, perRoom, onMessage, concurrency = 200, raw = false) {
  clients = [];
  for (let r = 0; r < rooms; r += 1) {
    const members = [];
    for (let m = 0; m < perRoom; m += 1) {
      const client = new Client(clients.length, `room${r}`, `u${r}x${m}`);
      clients.push(client);
      members.push(client);
    }
    for (const client of members) client.peers = members.filter((other) => other !== client);
  }
  if (raw) {
    // Requests (tokens included) are built before the clock starts.
    for (const client of clients) {
      const url = new URL(target.url(client.room, client.name));
      client.request = Buffer.from(
        `GET ${url.pathname}${url.search} HTTP/1.1\r\nHost: 127.0.0.1:${config.port}\r\n` +
          "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" +
          "Sec-WebSocket-Version: 13\r\n\r\n",
      );
    }
  }
  const joinTimes = [];
  let next = 0;
  const started = now();
  async function worker() {
    while (next < clients.length) {
      const client = clients[next];
      next += 1;
      joinTimes.push(await (raw ? client.openRaw() : client.open(onMessage)));
    }
  }
  await Promise.all(Array.from({ length: Math.min(concurrency, clients.length) }, worker));
  const seconds = (now() - started) / 1000;
  return { joinsPerSecond: clients.length / seconds, joinSeconds: seconds, joinTimes };
}

async function measuredWindow() {
  await sleep(config.warmup * 1000);
  const cpuBefore = process.cpuUsage();
  const wallBefore = now();
  measuring = true;
  emit({ phase: "window_start" });
  await sleep(config.seconds * 1000);
  measuring = false;
  emit({ phase: "window_end" });
  const cpu = process.cpuUsage(cpuBefore);
  const wall = (now() - wallBefore) / 1000;
  return { wall, generatorCpu: (cpu.user + cpu.system) / 1e6 / wall };
}

async function drain(expected) {
  stopping = true;
  const deadline = now() + (config.drain_ms ?? 3000);
  while (stats.delivered < expected() && now() < deadline) await sleep(20);
}

// S1 and S3: closed loop, each sender keeps `inflight` messages outstanding.
async function closedLoop(rooms, perRoom, inflight) {
  const outstanding = new Map(); // `${sender}:${seq}` -> deliveries still to arrive
  const fanout = perRoom - 1;
  const sendOne = (client) => {
    if (stopping) return;
    if (perRoom === 2) {
      client.send(client.peers[0]);
      client.inFlight += 1;
      return;
    }
    if (target.roomWide) {
      const seq = client.send(null);
      outstanding.set(`${client.index}:${seq}`, fanout);
    } else {
      // PeerJS has no rooms: one targeted copy per peer, the same seq for all.
      const seq = client.seq + 1;
      for (const peer of client.peers) {
        client.seq = seq - 1;
        client.send(peer);
      }
      outstanding.set(`${client.index}:${seq}`, fanout);
    }
    client.inFlight += 1;
  };
  const afterDelivery = (sender, seq) => {
    if (perRoom === 2) {
      sender.inFlight -= 1;
      sendOne(sender);
      return;
    }
    const key = `${sender.index}:${seq}`;
    const left = outstanding.get(key) - 1;
    if (left > 0) {
      outstanding.set(key, left);
      return;
    }
    outstanding.delete(key);
    sender.inFlight -= 1;
    sendOne(sender);
  };
  const join = await connectAll(rooms, perRoom, (receiver, data) => onDelivery(receiver, data, afterDelivery));
  for (const client of clients) for (let i = 0; i < inflight; i += 1) sendOne(client);
  const window = await measuredWindow();
  const perMessage = target.roomWide || perRoom === 2 ? fanout : 1;
  await drain(() => (target.roomWide || perRoom === 2 ? stats.sent * perMessage : stats.sent));
  const expected = target.roomWide || perRoom === 2 ? stats.sent * perMessage : stats.sent;
  return { ...window, join, rate: stats.inWindow / window.wall, lost: expected - stats.delivered };
}

// S2: open loop at a fixed total rate over rooms of two.
async function fixedRate(rooms, rate) {
  const join = await connectAll(rooms, 2, (receiver, data) => onDelivery(receiver, data));
  let turn = 0;
  let sentInLoop = 0;
  const started = now();
  const timer = setInterval(() => {
    const due = Math.floor(((now() - started) / 1000) * rate) - sentInLoop;
    for (let i = 0; i < due && !stopping; i += 1) {
      const client = clients[turn % clients.length];
      turn += 1;
      client.send(client.peers[0]);
      sentInLoop += 1;
    }
  }, 1);
  const window = await measuredWindow();
  clearInterval(timer);
  await drain(() => stats.sent);
  return { ...window, join, rate: stats.inWindow / window.wall, lost: stats.sent - stats.delivered };
}

// "count": a fixed number of messages, one in flight per sender (for instruction counts).
async function fixedCount(rooms, messages) {
  let remaining = messages;
  const join = await connectAll(rooms, 2, (receiver, data) =>
    onDelivery(receiver, data, (sender) => {
      if (remaining > 0) {
        remaining -= 1;
        sender.send(sender.peers[0]);
      }
    }),
  );
  emit({ phase: "window_start" });
  const started = now();
  for (const client of clients) {
    if (remaining > 0) {
      remaining -= 1;
      client.send(client.peers[0]);
    }
  }
  while (stats.delivered < stats.sent || remaining > 0) await sleep(5);
  emit({ phase: "window_end" });
  return { join, rate: stats.delivered / ((now() - started) / 1000), lost: stats.sent - stats.delivered, generatorCpu: null };
}

// S4 and S5: connections only.
async function connections(total, perRoom, hold) {
  emit({ phase: "baseline" });
  const cpuBefore = process.cpuUsage();
  emit({ phase: "window_start" });
  const join = await connectAll(Math.ceil(total / perRoom), perRoom, () => {}, config.concurrency ?? 200, true);
  emit({ phase: "window_end" });
  const cpu = process.cpuUsage(cpuBefore);
  emit({ phase: "connected", count: clients.length });
  await sleep(hold * 1000);
  emit({ phase: "measured" });
  stopping = true;
  return { join, rate: join.joinsPerSecond, lost: 0, generatorCpu: (cpu.user + cpu.system) / 1e6 / join.joinSeconds };
}

// Failover: `clients` in rooms of 4, member m of room r on node (r + m) % nodes,
// each sending one room-wide message every `interval_ms`. The orchestrator kills
// a node and writes "kill <index>" on stdin; that node's clients reconnect with the
// browser module's back-off (full jitter, 250 ms doubling to 5 s, reset on join)
// with the same token, through the other nodes (spread by client index), and
// resume. Measured from the kill: when each displaced client got its resumed
// room_state, and when it relays again (it received a message sent after its
// resume, and its first message after the resume reached another member, who
// answers at once);
// resumes per 100 ms; recovered true/false; and for the clients that were never
// displaced, every message between them exactly once and in order.
async function failover(total, interval) {
  const ports = config.ports;
  const rooms = Math.ceil(total / 4);
  clients = [];
  for (let r = 0; r < rooms; r += 1) {
    const members = [];
    for (let m = 0; m < 4 && clients.length < total; m += 1) {
      const client = new Client(clients.length, `room${r}`, `u${r}x${m}`);
      client.node = (r + m) % ports.length;
      client.token = jwt(client.name);
      client.received = new Map(); // sender index -> [unique count, duplicates, highest seq, seqs seen]
      clients.push(client);
      members.push(client);
    }
    for (const client of members) client.peers = members.filter((other) => other !== client);
  }
  let killAt = null;
  let killed = -1;
  const survivorsOf = () => ports.map((_, index) => index).filter((index) => index !== killed);
  const reorders = [];
  const storm = { attempts: 0, failedAttempts: 0, resumed: 0, recovered: 0, notRecovered: 0, fresh: 0, closes: 0 };

  const onMessage = (client, data) => {
    if (data.compare(RELAYED_PREFIX, 0, RELAYED_PREFIX.length, 0, RELAYED_PREFIX.length) !== 0) {
      const text = data.toString();
      if (text.startsWith('{"type":"room_state"') && client.connectedAt !== undefined && client.displaced) {
        const state = JSON.parse(text).payload;
        client.resumedAt = now();
        storm.resumed += 1;
        client.recovered = Boolean(state.recovered);
        if (!state.resumed) storm.fresh += 1;
        else if (state.recovered) storm.recovered += 1;
        else storm.notRecovered += 1;
        client.probeSeq = client.send(null); // its first message after the resume
      } else if (text.includes('"type":"error"')) {
        stats.errors.push(text.slice(0, 200));
      }
      return;
    }
    const senderIndex = tail(data, '"s":');
    const seq = tail(data, '"seq":');
    const sender = clients[senderIndex];
    stats.delivered += 1;
    const seen = client.received.get(senderIndex) ?? [0, 0, 0, new Set()];
    if (seen[3].has(seq)) seen[1] += 1; // a duplicate
    else {
      seen[0] += 1;
      seen[3].add(seq);
      if (seq < seen[2]) {
        client.reordered = (client.reordered ?? 0) + 1; // arrived after a later one
        if (client.displaced && reorders.length < 50) {
          // What the docs need to tell the causes apart: who, on which nodes, when.
          reorders.push({
            receiver: client.name, receiver_old: client.node, receiver_port: client.port, sender: sender.name,
            sender_displaced: Boolean(sender.displaced), sender_node: sender.node, sender_port: sender.port,
            seq, after: seen[2], resumed: client.resumedAt !== undefined,
            recovered: client.recovered ?? null, since_resume_ms: client.resumedAt === undefined ? null : now() - client.resumedAt,
            since_kill_ms: killAt === null ? null : now() - killAt, since_sent_ms: now() - tail(data, '"t":'),
            since_later_ms: now() - (seen[4] ?? 0),
          });
        }
      }
    }
    if (seq > seen[2]) seen[4] = now();
    seen[2] = Math.max(seen[2], seq);
    client.received.set(senderIndex, seen);
    if (client.resumedAt !== undefined && client.relayInAt === undefined && tail(data, '"t":') >= client.resumedAt) {
      client.relayInAt = now();
    }
    if (sender.probeSeq === seq && !client.displaced) {
      sender.relayOutAt ??= now();
      client.send(null); // an answer at once, so the resumed client's relay in is timed too
    }
  };

  const connect = (client, port) =>
    new Promise((resolve, reject) => {
      const ws = new WebSocket(`ws://127.0.0.1:${port}/webrtc/ws/${client.room}?token=${client.token}`, {
        perMessageDeflate: false, skipUTF8Validation: true, allowSynchronousEvents: true,
      });
      client.ws = ws;
      client.port = port;
      let joined = false;
      ws.on("message", (data) => {
        if (!joined && data.toString().startsWith('{"type":"room_state"')) {
          joined = true;
          client.attempt = 0;
          client.connectedAt ??= now();
          resolve();
        }
        onMessage(client, data);
      });
      ws.on("error", () => {});
      ws.on("close", () => {
        if (!joined) reject(new Error("closed before joining"));
        else if (!stopping && client.ws === ws) {
          storm.closes += 1;
          if (killAt === null || client.node !== killed) stats.errors.push(`client ${client.name} closed`);
          client.displaced = true;
          reconnect(client);
        }
      });
    });

  function reconnect(client) {
    const ceiling = Math.min(5000, 250 * 2 ** (client.attempt ?? 0));
    client.attempt = (client.attempt ?? 0) + 1;
    setTimeout(async () => {
      const survivors = survivorsOf();
      const node = survivors[(client.index + client.attempt) % survivors.length];
      storm.attempts += 1;
      try {
        await connect(client, ports[node]);
      } catch {
        storm.failedAttempts += 1;
        if (!stopping) reconnect(client);
      }
    }, Math.random() * ceiling);
  }

  const started = now();
  await eachAtMost(200, clients, (client) => connect(client, ports[client.node]));
  const seconds = (now() - started) / 1000;
  const join = { joinsPerSecond: clients.length / seconds, joinSeconds: seconds };

  // Steady traffic, spread over the interval: a slice of the clients sends every 10 ms.
  let tick = 0;
  const slices = Math.max(1, Math.round(interval / 10));
  const sender = setInterval(() => {
    tick += 1;
    for (let i = tick % slices; i < clients.length; i += slices) {
      const client = clients[i];
      if (!stopping && client.ws.readyState === WebSocket.OPEN && (!client.displaced || client.resumedAt)) {
        client.send(null);
      }
    }
  }, 10);
  await sleep(1000);
  emit({ phase: "ready", clients: clients.length });

  // Wait for "kill <index>" from the orchestrator (sent right after the signal).
  killed = await new Promise((resolve) => {
    let buffered = "";
    process.stdin.on("data", (chunk) => {
      buffered += chunk;
      const match = /kill (\d+)/.exec(buffered);
      if (match) resolve(Number(match[1]));
    });
  });
  killAt = now();
  const displaced = clients.filter((client) => client.node === killed);
  const deadline = killAt + (config.storm_ms ?? 60000);
  const done = () => displaced.every((c) => c.relayInAt !== undefined && c.relayOutAt !== undefined);
  while (!done() && now() < deadline) await sleep(20);
  await sleep(1000); // traffic after everyone is back
  stopping = true;
  clearInterval(sender);
  await sleep(config.drain_ms ?? 3000);

  // The rest of every room: clients never displaced, pairwise exactly once.
  let expected = 0;
  let lost = 0;
  let duplicated = 0;
  for (const receiver of clients) {
    if (receiver.displaced) continue;
    for (const peer of receiver.peers) {
      if (peer.displaced) continue;
      const [unique, dups] = receiver.received.get(peer.index) ?? [0, 0, 0];
      expected += peer.seq;
      lost += peer.seq - unique;
      duplicated += dups;
    }
  }
  let displacedDuplicates = 0;
  let displacedReordered = 0;
  let restReordered = 0;
  for (const receiver of clients) {
    if (!receiver.displaced) {
      restReordered += receiver.reordered ?? 0;
      continue;
    }
    for (const [, [, dups]] of receiver.received) displacedDuplicates += dups;
    displacedReordered += receiver.reordered ?? 0;
  }
  const since = (value) => (value === undefined ? null : (value - killAt) / 1000);
  const resumedTimes = displaced.map((c) => since(c.resumedAt)).filter((t) => t !== null).sort((a, b) => a - b);
  const relayTimes = displaced
    .map((c) => (c.relayInAt === undefined || c.relayOutAt === undefined ? null : since(Math.max(c.relayInAt, c.relayOutAt))))
    .filter((t) => t !== null)
    .sort((a, b) => a - b);
  const buckets = new Map();
  for (const t of resumedTimes) buckets.set(Math.floor(t * 10), (buckets.get(Math.floor(t * 10)) ?? 0) + 1);
  const timeline = Array.from({ length: resumedTimes.length ? Math.floor(resumedTimes.at(-1) * 10) + 1 : 0 },
    (_, i) => buckets.get(i) ?? 0);
  return {
    join,
    rate: null,
    lost,
    failover: {
      clients: clients.length, displaced: displaced.length, ...storm,
      all_resumed_s: resumedTimes.at(-1) ?? null, all_relaying_s: relayTimes.length === displaced.length ? relayTimes.at(-1) : null,
      relaying: relayTimes.length, median_resumed_s: percentile(resumedTimes, 50),
      peak_resumes_per_s: Math.max(0, ...timeline) * 10, resumes_per_100ms: timeline,
      rest_expected: expected, rest_lost: lost, rest_duplicated: duplicated, rest_reordered: restReordered,
      displaced_duplicates: displacedDuplicates, displaced_reordered: displacedReordered,
      reorders,
    },
  };
}

/** Run `task` for every item, at most `concurrency` at a time, in order. */
async function eachAtMost(concurrency, items, task) {
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const item = items[next];
      next += 1;
      await task(item);
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, items.length) }, worker));
}

// S6: a resume storm. Every client joins (its token verified once), its socket is
// dropped without a close (the slot is held), and the measured window is all of
// them coming back at once with the same tokens: resumes served from the token cache.
async function resumeStorm(total, perRoom) {
  const concurrency = config.concurrency ?? 200;
  const first = await connectAll(Math.ceil(total / perRoom), perRoom, () => {}, concurrency, true);
  for (const client of clients) client.socket.destroy();
  await sleep(1000); // the server sees every connection end and holds the slots
  for (const client of clients) client.joined = false;
  const cpuBefore = process.cpuUsage();
  emit({ phase: "window_start" });
  const started = now();
  await eachAtMost(concurrency, clients, (client) => client.openRaw());
  const seconds = (now() - started) / 1000;
  emit({ phase: "window_end" });
  const cpu = process.cpuUsage(cpuBefore);
  stopping = true;
  const join = { joinsPerSecond: clients.length / seconds, joinSeconds: seconds, joinTimes: [], firstPass: first.joinsPerSecond };
  return { join, rate: join.joinsPerSecond, lost: 0, generatorCpu: (cpu.user + cpu.system) / 1e6 / seconds };
}

function percentile(sorted, p) {
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

async function main() {
  let outcome;
  switch (config.scenario) {
    case "S1":
      outcome = await closedLoop(config.rooms ?? 100, 2, config.inflight ?? 8);
      break;
    case "S2":
      outcome = await fixedRate(config.rooms ?? 200, config.rate ?? 2000);
      break;
    case "S3":
      outcome = await closedLoop(config.rooms ?? 25, 8, config.inflight ?? 2);
      break;
    case "S4":
      outcome = await connections(config.connections, 4, config.hold ?? 1);
      break;
    case "S5":
      outcome = await connections(config.connections ?? 2000, 4, 0);
      break;
    case "count":
      outcome = await fixedCount(config.rooms ?? 10, config.messages ?? 0);
      break;
    case "S6":
      outcome = await resumeStorm(config.connections ?? 2000, 4);
      break;
    case "failover":
      outcome = await failover(config.clients ?? 5000, config.interval_ms ?? 1000);
      break;
    default:
      throw new Error(`unknown scenario ${config.scenario}`);
  }
  const sorted = stats.latencies.sort((a, b) => a - b);
  const { joinTimes, firstPass, ...join } = outcome.join;
  emit({
    phase: "result",
    scenario: config.scenario,
    target: config.target,
    rate: outcome.rate,
    p50_ms: percentile(sorted, 50),
    p99_ms: percentile(sorted, 99),
    p999_ms: percentile(sorted, 99.9),
    sent: stats.sent,
    delivered: stats.delivered,
    lost: outcome.lost,
    misordered: stats.misordered,
    checked: stats.checked,
    bad_envelopes: stats.badEnvelopes,
    errors: stats.errors.slice(0, 5),
    generator_cpu: outcome.generatorCpu,
    join,
    failover: outcome.failover,
  });
  for (const client of clients) {
    if (client.ws) client.ws.terminate();
    else client.socket?.destroy();
  }
  process.exit(0);
}

main().catch((error) => {
  emit({ phase: "result", scenario: config.scenario, target: config.target, fatal: String(error) });
  process.exit(1);
});
