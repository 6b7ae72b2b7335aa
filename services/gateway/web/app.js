// The web client. It speaks only the public contract (docs/protocol.md): the HTTP API and
// one WebSocket. Every text that came from a user is put in the page with textContent,
// never as HTML.

const $ = (id) => document.getElementById(id);
const SESSION_KEY = "chat.session";
const PAGE = 50;
const TYPING_EVERY_MS = 3000;
const TYPING_SHOWN_MS = 4000;

// ---------------------------------------------------------------------------------------
// State

let session = load(SESSION_KEY); // {token, user_id, username, expires_at}
let socket = null;
let connected = false; // hello received on the current socket
let reconnectAttempt = 0;
let reconnectTimer = null;
let current = null; // the open conversation's peer id
let lastTypingSent = 0;
let typingTimer = null;
let pendingAcks = [];
let ackTimer = null;

/** peer id → {peer: {user_id, username, online, last_seen}, last_message, unread} */
const conversations = new Map();
/** peer id → {byId: Map(msg_id → MESSAGE), hasMore, loaded, loading} */
const threads = new Map();
/** client_id → {client_id, to, body, ts, failed?} — sends without `sent` yet, kept across reloads */
let outbox = new Map();

function load(key) {
  try {
    return JSON.parse(localStorage.getItem(key));
  } catch {
    return null;
  }
}

function outboxKey() {
  return `chat.outbox.${session.user_id}`;
}

function saveOutbox() {
  localStorage.setItem(outboxKey(), JSON.stringify([...outbox.values()]));
}

function thread(peer) {
  let t = threads.get(peer);
  if (!t) {
    t = { byId: new Map(), hasMore: true, loaded: false, loading: false };
    threads.set(peer, t);
  }
  return t;
}

// ---------------------------------------------------------------------------------------
// HTTP

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  if (session) headers.Authorization = `Bearer ${session.token}`;
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    throw new ApiError(0, "network", "Cannot reach the server. Check your connection.");
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const e = data.error || {};
    if (response.status === 401 && session && path !== "/api/v1/login") {
      logout("Your session ended. Please log in again.");
    }
    throw new ApiError(response.status, e.code || "internal", e.message || response.statusText);
  }
  return data;
}

// ---------------------------------------------------------------------------------------
// Logging in

function showFieldError(field, text) {
  $(`${field}-error`).textContent = text;
  $(field).setAttribute("aria-invalid", text ? "true" : "false");
}

function clearAuthErrors() {
  showFieldError("username", "");
  showFieldError("password", "");
  $("auth-error").textContent = "";
}

function showAuthError(e) {
  switch (e.code) {
    case "invalid_username":
    case "username_taken":
      showFieldError("username", e.code === "username_taken"
        ? "That name is taken. Pick another, or log in."
        : "3 to 32 letters, digits, or . _ -");
      $("username").focus();
      break;
    case "invalid_password":
      showFieldError("password", "At least 8 characters.");
      $("password").focus();
      break;
    case "bad_credentials":
      showFieldError("password", "Wrong username or password.");
      $("password").focus();
      break;
    case "rate_limited":
      $("auth-error").textContent = "Too many attempts. Wait a minute and try again.";
      break;
    default:
      $("auth-error").textContent = e.message;
  }
}

async function login(username, password) {
  const r = await api("POST", "/api/v1/login", { username, password });
  session = { token: r.token, user_id: r.user_id, username: r.username, expires_at: r.expires_at };
  localStorage.setItem(SESSION_KEY, JSON.stringify(session));
  start();
}

async function submitAuth(register) {
  clearAuthErrors();
  const username = $("username").value.trim();
  const password = $("password").value;
  if (!username) return showFieldError("username", "Enter a username.");
  if (!password) return showFieldError("password", "Enter a password.");
  if (register && password.length < 8) return showFieldError("password", "At least 8 characters.");
  const buttons = [$("login"), $("register")];
  buttons.forEach((b) => (b.disabled = true));
  try {
    if (register) await api("POST", "/api/v1/register", { username, password });
    await login(username, password);
  } catch (e) {
    showAuthError(e);
  } finally {
    buttons.forEach((b) => (b.disabled = false));
  }
}

function logout(reason) {
  if (socket) {
    socket.onclose = null;
    socket.close(1000);
  }
  socket = null;
  connected = false;
  clearTimeout(reconnectTimer);
  localStorage.removeItem(SESSION_KEY);
  session = null;
  conversations.clear();
  threads.clear();
  outbox = new Map();
  current = null;
  $("chat").hidden = true;
  $("placeholder").hidden = false;
  document.body.classList.remove("in-chat");
  $("conversations").replaceChildren();
  $("results").replaceChildren();
  $("app").hidden = true;
  $("auth").hidden = false;
  $("password").value = "";
  clearAuthErrors();
  if (reason) $("auth-error").textContent = reason;
  document.title = "Chat";
  $("username").focus();
}

// ---------------------------------------------------------------------------------------
// The socket

function connect() {
  clearTimeout(reconnectTimer);
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/ws?token=${encodeURIComponent(session.token)}`);
  socket = ws;
  setConnection(reconnectAttempt === 0 ? "connecting" : "reconnecting");
  ws.onmessage = (event) => {
    let frame;
    try {
      frame = JSON.parse(event.data);
    } catch {
      return;
    }
    onFrame(frame);
  };
  ws.onclose = (event) => {
    if (socket !== ws) return;
    socket = null;
    connected = false;
    if (event.code === 4001) {
      logout("Your session expired. Please log in again.");
      return;
    }
    scheduleReconnect();
  };
}

function scheduleReconnect() {
  // Backoff with jitter: many clients of a restarted server must not come back in step.
  const ceiling = Math.min(30000, 500 * 2 ** reconnectAttempt);
  const delay = ceiling / 2 + Math.random() * (ceiling / 2);
  reconnectAttempt += 1;
  setConnection("reconnecting");
  reconnectTimer = setTimeout(async () => {
    // A token that no longer works would be refused at the upgrade: check it first.
    try {
      await api("GET", "/api/v1/me");
    } catch (e) {
      if (!session) return; // logged out on 401
    }
    if (session) connect();
  }, delay);
}

function setConnection(state) {
  const el = $("connection");
  el.dataset.state = state;
  el.textContent = state === "online" ? "" : state === "connecting" ? "Connecting…" : "Reconnecting…";
}

function sendFrame(frame) {
  if (!socket || socket.readyState !== WebSocket.OPEN || !connected) return false;
  socket.send(JSON.stringify(frame));
  return true;
}

function onFrame(f) {
  switch (f.type) {
    case "hello":
      connected = true;
      reconnectAttempt = 0;
      setConnection("online");
      flushOutbox();
      break;
    case "backlog_done":
      // What happened while we were away: unread counts, receipts, the open page.
      refreshConversations();
      if (current !== null) loadNewest(current);
      break;
    case "message":
      onMessage(f);
      break;
    case "sent":
      onSent(f);
      break;
    case "receipt":
      onReceipt(f);
      break;
    case "presence":
      onPresence(f);
      break;
    case "typing":
      onTyping(f.from);
      break;
    case "error":
      onError(f);
      break;
  }
}

// ---------------------------------------------------------------------------------------
// Messages

function peerOf(m) {
  return m.from === session.user_id ? m.to : m.from;
}

const STATUS_RANK = { pending: 0, sent: 1, delivered: 2, read: 3 };

/** Adds or updates a message; returns true when it was new to this device. */
function remember(m) {
  const t = thread(peerOf(m));
  const old = t.byId.get(m.msg_id);
  if (old) {
    if (STATUS_RANK[m.status] > STATUS_RANK[old.status]) old.status = m.status;
    return false;
  }
  t.byId.set(m.msg_id, { ...m });
  if (m.from === session.user_id && outbox.delete(m.client_id)) saveOutbox();
  return true;
}

function onMessage(m) {
  const peer = peerOf(m);
  const isNew = remember(m);
  if (m.from !== session.user_id) queueAck(m.msg_id);
  if (!isNew) return;
  const c = conversations.get(peer);
  if (!c) {
    awaitConversation(peer);
  } else {
    if (!c.last_message || c.last_message.msg_id < m.msg_id) c.last_message = m;
    if (m.from !== session.user_id) {
      if (peer === current && document.visibilityState === "visible") markRead(peer);
      else c.unread += 1;
    }
    if (m.from === peer) c.typingUntil = 0;
  }
  renderConversations();
  if (peer === current) renderThread({ stickToBottom: true });
}

function onSent(f) {
  const p = outbox.get(f.client_id);
  if (!p) return;
  outbox.delete(f.client_id);
  saveOutbox();
  const m = { msg_id: f.msg_id, from: session.user_id, to: p.to, body: p.body, ts: f.ts, client_id: f.client_id, status: "sent" };
  remember(m);
  const c = conversations.get(p.to);
  if (c) {
    if (!c.last_message || c.last_message.msg_id < m.msg_id) c.last_message = m;
  } else {
    awaitConversation(p.to);
  }
  renderConversations();
  if (p.to === current) renderThread({ stickToBottom: true });
}

function onReceipt(f) {
  const t = threads.get(f.peer);
  if (t) {
    for (const m of t.byId.values()) {
      if (m.from !== session.user_id) continue;
      if (f.status === "read" ? m.msg_id <= f.msg_id : m.msg_id === f.msg_id) {
        if (STATUS_RANK[f.status] > STATUS_RANK[m.status]) m.status = f.status;
      }
    }
  }
  const c = conversations.get(f.peer);
  if (c && c.last_message && c.last_message.from === session.user_id) {
    const lm = c.last_message;
    if (f.status === "read" ? lm.msg_id <= f.msg_id : lm.msg_id === f.msg_id) {
      if (STATUS_RANK[f.status] > STATUS_RANK[lm.status]) lm.status = f.status;
    }
  }
  if (f.peer === current) renderThread({});
  renderConversations();
}

function onPresence(f) {
  const c = conversations.get(f.user_id);
  if (c) {
    c.peer.online = f.online;
    if (f.last_seen) c.peer.last_seen = f.last_seen;
  }
  renderConversations();
  if (f.user_id === current) renderPeerState();
}

function onTyping(from) {
  const c = conversations.get(from);
  if (!c) return;
  c.typingUntil = Date.now() + TYPING_SHOWN_MS;
  if (from === current) renderPeerState();
  clearTimeout(typingTimer);
  typingTimer = setTimeout(() => {
    if (current !== null) renderPeerState();
  }, TYPING_SHOWN_MS + 50);
}

function onError(f) {
  if (!f.client_id) return;
  const p = outbox.get(f.client_id);
  if (!p) return;
  if (f.code === "rate_limited" || f.code === "internal") {
    // Not refused for what it is: try again shortly, with the same client_id.
    setTimeout(() => sendFrame({ type: "send", client_id: p.client_id, to: p.to, body: p.body }), 1000);
    return;
  }
  p.failed = f.message;
  saveOutbox();
  if (p.to === current) renderThread({});
}

function queueAck(id) {
  pendingAcks.push(id);
  if (ackTimer) return;
  ackTimer = setTimeout(() => {
    ackTimer = null;
    while (pendingAcks.length) {
      const batch = pendingAcks.splice(0, 500);
      if (!sendFrame({ type: "ack", msg_ids: batch })) {
        pendingAcks = []; // unacked messages come again in the next backlog
        return;
      }
    }
  }, 50);
}

function markRead(peer) {
  const t = threads.get(peer);
  const c = conversations.get(peer);
  if (!t) return;
  let newest = null;
  for (const m of t.byId.values()) {
    if (m.from === peer && (newest === null || m.msg_id > newest)) newest = m.msg_id;
  }
  if (newest !== null && sendFrame({ type: "read", peer, up_to: newest }) && c) c.unread = 0;
  updateTitle();
}

function flushOutbox() {
  for (const p of outbox.values()) {
    if (!p.failed) sendFrame({ type: "send", client_id: p.client_id, to: p.to, body: p.body });
  }
}

function send(body) {
  if (current === null) return;
  const p = { client_id: crypto.randomUUID(), to: current, body, ts: Date.now() };
  outbox.set(p.client_id, p);
  saveOutbox();
  sendFrame({ type: "send", client_id: p.client_id, to: p.to, body: p.body });
  renderThread({ stickToBottom: true });
}

// ---------------------------------------------------------------------------------------
// Loading

async function refreshConversations() {
  try {
    const r = await api("GET", "/api/v1/conversations");
    for (const c of r.conversations) {
      const old = conversations.get(c.peer.user_id);
      conversations.set(c.peer.user_id, { ...c, typingUntil: old ? old.typingUntil : 0 });
      if (c.last_message) remember(c.last_message);
      if (c.peer.user_id === current && c.unread > 0 && document.visibilityState === "visible") {
        loadNewest(current).then(() => markRead(current));
      }
    }
    // Conversations never disappear; one begun here but not stored yet stays as it is.
    renderConversations();
    if (current !== null) renderPeerState();
  } catch {
    // Shown as the connection state; tried again on the next reconnect.
  }
}

/** A live message can come before the store has written it: ask again until the server lists
 *  the conversation (it knows the peer's name). */
const awaited = new Set();
async function awaitConversation(peer) {
  if (awaited.has(peer)) return;
  awaited.add(peer);
  try {
    for (let attempt = 0; attempt < 20 && session && !conversations.has(peer); attempt++) {
      await refreshConversations();
      if (conversations.has(peer)) break;
      await new Promise((resolve) => setTimeout(resolve, 250 * Math.min(attempt + 1, 8)));
    }
  } finally {
    awaited.delete(peer);
  }
}

async function loadNewest(peer) {
  const r = await api("GET", `/api/v1/conversations/${peer}/messages?limit=${PAGE}`);
  const t = thread(peer);
  const wasLoaded = t.loaded;
  r.messages.forEach(remember);
  if (!wasLoaded) t.hasMore = r.has_more;
  t.loaded = true;
  if (peer === current) renderThread({ stickToBottom: true });
}

async function loadOlder(peer) {
  const t = thread(peer);
  if (t.loading || !t.hasMore || !t.loaded) return;
  const oldest = [...t.byId.keys()].sort()[0];
  if (!oldest) return;
  t.loading = true;
  try {
    const r = await api("GET", `/api/v1/conversations/${peer}/messages?limit=${PAGE}&before=${oldest}`);
    r.messages.forEach(remember);
    t.hasMore = r.has_more;
    if (peer === current) renderThread({ keepPosition: true });
  } finally {
    t.loading = false;
  }
}

// ---------------------------------------------------------------------------------------
// Rendering (textContent only)

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function formatTime(ts) {
  const d = new Date(ts);
  const now = new Date();
  if (d.toDateString() === now.toDateString()) {
    return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }
  return d.toLocaleDateString([], { month: "short", day: "numeric" });
}

function lastSeenText(peer) {
  if (peer.online) return "online";
  if (!peer.last_seen) return "offline";
  return `last seen ${formatTime(peer.last_seen)}`;
}

function totalUnread() {
  let n = 0;
  for (const c of conversations.values()) n += c.unread;
  return n;
}

function updateTitle() {
  const n = totalUnread();
  document.title = n > 0 ? `(${n}) Chat` : "Chat";
}

function renderConversations() {
  const list = $("conversations");
  const sorted = [...conversations.values()].sort((a, b) => {
    const x = a.last_message ? a.last_message.msg_id : "";
    const y = b.last_message ? b.last_message.msg_id : "";
    return x < y ? 1 : x > y ? -1 : 0;
  });
  list.replaceChildren(...sorted.map(conversationItem));
  $("no-conversations").hidden = sorted.length > 0;
  updateTitle();
}

function conversationItem(c) {
  const li = el("li");
  const b = el("button", "item" + (c.peer.user_id === current ? " active" : ""));
  b.type = "button";
  b.dataset.peer = c.peer.user_id;
  if (c.peer.user_id === current) b.setAttribute("aria-current", "true");
  const dot = el("span", "dot" + (c.peer.online ? " online" : ""));
  dot.setAttribute("role", "img");
  dot.setAttribute("aria-label", c.peer.online ? "online" : "offline");
  const name = el("span", "name", c.peer.username);
  const top = el("span", "top");
  top.append(dot, name);
  if (c.last_message) top.append(el("time", "when", formatTime(c.last_message.ts)));
  const bottom = el("span", "bottom");
  let preview = "";
  if (c.last_message) {
    preview = (c.last_message.from === session.user_id ? "You: " : "") + c.last_message.body;
  }
  bottom.append(el("span", "preview", preview));
  if (c.unread > 0) {
    const badge = el("span", "badge", String(c.unread));
    badge.setAttribute("aria-label", `${c.unread} unread`);
    bottom.append(badge);
  }
  b.append(top, bottom);
  b.addEventListener("click", () => open(c.peer.user_id));
  li.append(b);
  return li;
}

function renderPeerState() {
  const c = conversations.get(current);
  if (!c) return;
  $("peer-name").textContent = c.peer.username;
  const typing = c.typingUntil && c.typingUntil > Date.now();
  $("peer-state").textContent = typing ? "typing…" : lastSeenText(c.peer);
}

const STATUS_MARK = { pending: "◷", sent: "✓", delivered: "✓✓", read: "✓✓" };

function messageItem(m, pending) {
  const mine = m.from === session.user_id;
  const row = el("div", "msg " + (mine ? "mine" : "theirs"));
  row.dataset.id = m.msg_id || "";
  row.append(el("p", "body", m.body));
  const meta = el("span", "meta");
  meta.append(el("time", "", formatTime(m.ts)));
  if (mine) {
    const status = pending ? (m.failed ? "failed" : "pending") : m.status;
    const mark = el("span", `status ${status}`, status === "failed" ? "!" : STATUS_MARK[status]);
    mark.setAttribute("aria-label", status);
    mark.title = status === "failed" ? `not sent: ${m.failed}` : status;
    row.dataset.status = status;
    meta.append(mark);
  }
  row.append(meta);
  return row;
}

function renderThread({ stickToBottom = false, keepPosition = false }) {
  if (current === null) return;
  const box = $("messages");
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  const fromBottom = box.scrollHeight - box.scrollTop;
  const t = thread(current);
  const items = [...t.byId.values()].sort((a, b) => (a.msg_id < b.msg_id ? -1 : 1));
  const nodes = items.map((m) => messageItem(m, false));
  for (const p of outbox.values()) {
    if (p.to === current) nodes.push(messageItem({ ...p, from: session.user_id }, true));
  }
  if (t.loaded && !t.hasMore) nodes.unshift(el("p", "start muted", "This is the start of your conversation."));
  box.replaceChildren(...nodes);
  if (keepPosition) box.scrollTop = box.scrollHeight - fromBottom;
  else if (stickToBottom || atBottom) box.scrollTop = box.scrollHeight;
  renderPeerState();
}

async function open(peer) {
  current = peer;
  $("placeholder").hidden = true;
  $("chat").hidden = false;
  document.body.classList.add("in-chat");
  $("results").replaceChildren();
  $("find").value = "";
  renderConversations();
  renderThread({ stickToBottom: true });
  $("message").focus();
  try {
    await loadNewest(peer);
    markRead(peer);
    renderConversations();
  } catch {
    // Offline: what is known is shown; the reconnect loads the rest.
  }
}

function closeChat() {
  current = null;
  $("chat").hidden = true;
  $("placeholder").hidden = false;
  document.body.classList.remove("in-chat");
  renderConversations();
}

// ---------------------------------------------------------------------------------------
// Finding people

let findTimer = null;

function find(q) {
  clearTimeout(findTimer);
  if (!q) {
    $("results").replaceChildren();
    return;
  }
  findTimer = setTimeout(async () => {
    try {
      const r = await api("GET", `/api/v1/users?q=${encodeURIComponent(q)}&limit=20`);
      if ($("find").value.trim() !== q) return;
      const users = r.users.filter((u) => u.user_id !== session.user_id);
      const items = users.map((u) => {
        const li = el("li");
        const b = el("button", "item");
        b.type = "button";
        const dot = el("span", "dot" + (u.online ? " online" : ""));
        dot.setAttribute("role", "img");
        dot.setAttribute("aria-label", u.online ? "online" : "offline");
        const top = el("span", "top");
        top.append(dot, el("span", "name", u.username));
        b.append(top);
        b.addEventListener("click", () => {
          if (!conversations.has(u.user_id)) {
            conversations.set(u.user_id, {
              peer: { user_id: u.user_id, username: u.username, online: u.online, last_seen: null },
              last_message: null,
              unread: 0,
              typingUntil: 0,
            });
          }
          open(u.user_id);
        });
        li.append(b);
        return li;
      });
      if (items.length === 0) items.push(el("li", "muted empty", "Nobody by that name."));
      $("results").replaceChildren(...items);
    } catch {
      // Ignored: the next keystroke tries again.
    }
  }, 200);
}

// ---------------------------------------------------------------------------------------
// Start

function start() {
  $("auth").hidden = true;
  $("app").hidden = false;
  $("me").textContent = session.username;
  outbox = new Map((load(outboxKey()) || []).map((p) => [p.client_id, p]));
  renderConversations();
  refreshConversations();
  reconnectAttempt = 0;
  connect();
}

function wire() {
  $("auth-form").addEventListener("submit", (e) => {
    e.preventDefault();
    submitAuth(false);
  });
  $("register").addEventListener("click", () => submitAuth(true));
  $("logout").addEventListener("click", () => logout());
  $("find").addEventListener("input", (e) => find(e.target.value.trim()));
  $("back").addEventListener("click", closeChat);
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("message").value;
    if (!text.trim()) return;
    send(text);
    $("message").value = "";
    $("message").style.height = "";
  });
  $("message").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
    if (e.key === "Escape" && window.matchMedia("(max-width: 700px)").matches) closeChat();
  });
  $("message").addEventListener("input", (e) => {
    const box = e.target;
    box.style.height = "";
    box.style.height = `${Math.min(box.scrollHeight, 160)}px`;
    if (current !== null && Date.now() - lastTypingSent > TYPING_EVERY_MS && box.value) {
      if (sendFrame({ type: "typing", to: current })) lastTypingSent = Date.now();
    }
  });
  $("messages").addEventListener("scroll", (e) => {
    if (e.target.scrollTop < 80 && current !== null) loadOlder(current);
  });
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible" && current !== null) {
      markRead(current);
      renderConversations();
    }
  });
  window.addEventListener("online", () => {
    if (session && !socket) connect();
  });
}

wire();
if (session) start();
else {
  $("auth").hidden = false;
  $("username").focus();
}
