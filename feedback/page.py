"""The labeling page: one HTML document, its CSS and JavaScript inline, nothing fetched from
anywhere but its own server's API (the Content-Security-Policy allows only these exact inline
blocks, by hash, and ``connect-src 'self'``).

What a labeler sees: the prompt, the two responses side by side as A (left) and B (right), in
the order the lease drew; buttons A / B / Tie / Skip, and the keys ``a`` / ``←`` / ``1``,
``b`` / ``→`` / ``2``, ``t`` / ``3``, ``s`` / ``0``; their name; how many pairs they labeled and
how many wait in the queue. The name comes from ``?labeler=NAME`` or a form (kept in
localStorage); a token from ``#token=...`` (the fragment never reaches a server or a log) or
the form (kept in sessionStorage). The page shows texts with ``textContent`` only: a response
containing HTML is shown as text, never run.

Hooks for tests and scripts: ``body[data-state]`` is login / busy / ready / empty, and
``body[data-lease]`` the lease on screen.
"""

from __future__ import annotations

import base64
import hashlib

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0; background: #f6f6f4; color: #222; }
header { display: flex; gap: 1.5em; align-items: baseline; padding: .6em 1.2em;
         background: #2d3540; color: #eee; }
header b { color: #fff; }
main { max-width: 1200px; margin: 1em auto; padding: 0 1em; }
#status { min-height: 1.4em; color: #a33; }
.prompt, .response { white-space: pre-wrap; background: #fff; border: 1px solid #ccc;
                     border-radius: 6px; padding: .8em 1em; }
.prompt { margin-bottom: 1em; border-left: 4px solid #2d3540; }
.sides { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
.sides h2 { font-size: 1em; margin: 0 0 .3em; }
nav { display: flex; gap: .8em; justify-content: center; margin: 1.2em 0; }
button { font: inherit; padding: .5em 1.2em; border-radius: 6px; border: 1px solid #888;
         background: #fff; cursor: pointer; }
button:hover { background: #e8eef6; }
kbd { font-size: .8em; border: 1px solid #aaa; border-radius: 3px; padding: 0 .3em; }
form { display: grid; gap: .6em; max-width: 24em; }
"""

SCRIPT = """
"use strict";
const $ = (id) => document.getElementById(id);
const KEYS = {a: "left", ArrowLeft: "left", "1": "left", b: "right", ArrowRight: "right",
              "2": "right", t: "tie", "3": "tie", s: "skip", "0": "skip"};
const fragment = new URLSearchParams(location.hash.slice(1));
if (fragment.get("token")) {
  sessionStorage.setItem("feedback-token", fragment.get("token"));
  history.replaceState(null, "", location.pathname + location.search);
}
let labeler = new URLSearchParams(location.search).get("labeler")
  || localStorage.getItem("feedback-labeler") || "";
let token = sessionStorage.getItem("feedback-token") || "";
let lease = null, busy = false, timer = null;

function state(s) { document.body.dataset.state = s; }
function say(text) { $("status").textContent = text; }
function problem(data, status) {
  return (data && data.error) ? data.error.code + ": " + data.error.message : "HTTP " + status;
}
async function api(path, body) {
  const headers = {"Content-Type": "application/json"};
  if (token) headers["Authorization"] = "Bearer " + token;
  try {
    const r = await fetch(path, {method: "POST", headers, body: JSON.stringify(body)});
    return {status: r.status, data: await r.json().catch(() => null)};
  } catch (e) {
    return {status: 0, data: {error: {code: "UNAVAILABLE", message: "server unreachable"}}};
  }
}
function login(message) {
  busy = false; lease = null; state("login"); say(message || "");
  $("task").hidden = true; $("login").hidden = false; $("name").value = labeler;
  $("name").focus();
}
function retry(ms) { clearTimeout(timer); timer = setTimeout(next, ms); }
async function next() {
  busy = true; state("busy");
  const {status, data} = await api("/v1/leases", {labeler: labeler, count: 1});
  if (status === 401) return login("This server needs a token.");
  if (status === 400) return login(problem(data, status));  // a name the server refuses
  busy = false;
  if (status !== 200) { say(problem(data, status)); state("empty"); return retry(3000); }
  $("depth").textContent = data.queue_depth;
  $("done").textContent = data.labeler_judgments;
  if (!data.leases.length) {
    lease = null; $("task").hidden = true; state("empty");
    say("Nothing to label right now; looking again every 5 s.");
    return retry(5000);
  }
  lease = data.leases[0];
  $("prompt").textContent = lease.prompt;
  $("left").textContent = lease.left;
  $("right").textContent = lease.right;
  $("task").hidden = false;
  document.body.dataset.lease = lease.lease_id;
  state("ready");
}
async function answer(choice) {
  if (busy || !lease) return;
  busy = true; state("busy");
  const {status, data} = await api("/v1/judgments", {lease_id: lease.lease_id, choice: choice});
  if (status === 401) return login("This server needs a token.");
  if (status === 200) say("");
  else if (status === 410) say("That pair's lease expired before your answer; it went back "
                               + "to the queue.");
  else { say(problem(data, status)); busy = false; state("ready"); return; }
  await next();
}
document.addEventListener("keydown", (e) => {
  if (e.target.closest("input") || e.ctrlKey || e.metaKey || e.altKey) return;
  const choice = KEYS[e.key.length === 1 ? e.key.toLowerCase() : e.key];
  if (choice) { e.preventDefault(); answer(choice); }
});
for (const button of document.querySelectorAll("button[data-choice]")) {
  button.addEventListener("click", () => answer(button.dataset.choice));
}
$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  labeler = $("name").value.trim();
  if ($("token").value) {
    token = $("token").value;
    sessionStorage.setItem("feedback-token", token);
  }
  localStorage.setItem("feedback-labeler", labeler);
  $("who").textContent = labeler; $("login").hidden = true; say("");
  document.activeElement.blur();  // the keys go to the page, not the hidden form
  next();
});
$("who").textContent = labeler;
if (labeler) next(); else login("Your name is recorded with each judgment.");
"""

BODY = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Which response is better? · feedback</title>
<style>{style}</style>
</head>
<body data-state="busy">
<header><b>Which response is better?</b>
  <span>Labeler: <b id="who"></b></span>
  <span>Labeled by you: <b id="done">0</b></span>
  <span>Waiting in the queue: <b id="depth">?</b></span></header>
<main>
<p id="status" role="status"></p>
<form id="login" hidden>
  <label>Your name <input id="name" required maxlength="64" autocomplete="username"></label>
  <label>Token (if the server asks for one) <input id="token" type="password"
    autocomplete="off"></label>
  <button type="submit">Start labeling</button>
</form>
<section id="task" hidden>
  <div id="prompt" class="prompt"></div>
  <div class="sides">
    <article><h2>A</h2><div id="left" class="response"></div></article>
    <article><h2>B</h2><div id="right" class="response"></div></article>
  </div>
  <nav>
    <button id="btn-left" data-choice="left">A is better <kbd>A</kbd></button>
    <button id="btn-tie" data-choice="tie">Tie <kbd>T</kbd></button>
    <button id="btn-right" data-choice="right">B is better <kbd>B</kbd></button>
    <button id="btn-skip" data-choice="skip">Skip <kbd>S</kbd></button>
  </nav>
</section>
</main>
<script>{script}</script>
</body>
</html>
"""


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


HTML = BODY.format(style=STYLE, script=SCRIPT)
CSP = (f"default-src 'none'; style-src {_hash(STYLE)}; script-src {_hash(SCRIPT)}; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
