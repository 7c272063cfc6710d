// Porthole remote access page. No framework, no build step. Every text that comes from the
// server (and through it from the build machine) is inserted with textContent, never as HTML.
"use strict";

(function () {
  const POLL_MS = 5000;          // while instructions are shown
  const WAIT_MS = 3000;          // while the build machine has not connected (409)
  const MAX_BACKOFF_MS = 60000;  // network or server errors back off up to this
  const DENIED_MESSAGE = "Users with the Testers/QA role cannot use remote access";
  const MASK = "••••••••••••";

  const $ = (id) => document.getElementById(id);

  // The session id is the last path segment; the relay validated it before serving the page.
  const sessionId = location.pathname.split("/").filter(Boolean).pop() || "";
  // The token travels in the fragment, which browsers never send to a server.
  const tokenOf = () => new URLSearchParams(location.hash.slice(1)).get("token") || "";
  let token = tokenOf();

  const secrets = { ssh: null, vnc: null };   // passwords: in memory, in the DOM only when shown
  let deadline = null;                         // Date the countdown runs to
  let deadlineKind = "";                       // "available_until" | "hard_cap"
  let errors = 0;
  let timer = null;
  let generation = 0;                          // answers to an older token are dropped
  let ticker = null;

  function show(id, visible) { $(id).hidden = !visible; }

  function setState(state, text) {
    const el = $("state");
    el.dataset.state = state;
    if (el.textContent !== text) el.textContent = text;
  }

  function setMessage(text) {
    const el = $("message");
    el.textContent = text || "";
    el.hidden = !text;
  }

  function clearInstructions() {
    secrets.ssh = null;
    secrets.vnc = null;
    for (const id of ["ssh-command", "ssh-known-hosts", "ssh-strict-command", "ssh-known-hosts-file",
      "vnc-address", "vnc-username"]) {
      $(id).textContent = "";
    }
    for (const kind of ["ssh", "vnc"]) hideSecret(kind);
    $("vnc-link").setAttribute("href", "#");
    show("ssh", false);
    show("vnc", false);
    deadline = null;
    show("deadline", false);
    document.body.dataset.sessionState = "";
  }

  function hideSecret(kind) {
    const el = $(kind + "-password");
    el.textContent = MASK;
    el.dataset.hidden = "true";
    const button = $(kind + "-password-reveal");
    button.setAttribute("aria-pressed", "false");
    button.textContent = "Show password";
  }

  function revealSecret(kind) {
    if (secrets[kind] === null) return;
    const el = $(kind + "-password");
    el.textContent = secrets[kind];
    el.dataset.hidden = "false";
    const button = $(kind + "-password-reveal");
    button.setAttribute("aria-pressed", "true");
    button.textContent = "Hide password";
  }

  // Shell quoting of a file name, like the relay's (only for names we make up).
  function knownHostsFile() {
    return "porthole_known_hosts_" + sessionId.replace(/[^A-Za-z0-9_]/g, "");
  }

  function renderSsh(ssh) {
    if (!ssh) { show("ssh", false); secrets.ssh = null; return; }
    $("ssh-command").textContent = ssh.command;
    const hasPassword = typeof ssh.password === "string" && ssh.password !== "";
    const changed = secrets.ssh !== (hasPassword ? ssh.password : null);
    secrets.ssh = hasPassword ? ssh.password : null;
    show("ssh-password-field", hasPassword);
    if (changed || !hasPassword) hideSecret("ssh");
    if (typeof ssh.known_hosts === "string" && ssh.known_hosts !== "") {
      const file = knownHostsFile();
      $("ssh-known-hosts").textContent = ssh.known_hosts;
      $("ssh-known-hosts-file").textContent = file;
      // The relay's command is `ssh -p PORT DEST` with every part already shell-quoted.
      const rest = ssh.command.replace(/^ssh /, "");
      $("ssh-strict-command").textContent =
        "ssh -o UserKnownHostsFile=" + file + " -o StrictHostKeyChecking=yes " + rest;
      show("ssh-known-hosts-field", true);
    } else {
      show("ssh-known-hosts-field", false);
    }
    show("ssh", true);
  }

  function renderVnc(vnc) {
    if (!vnc) { show("vnc", false); secrets.vnc = null; return; }
    $("vnc-address").textContent = vnc.address;
    const user = typeof vnc.username === "string" ? vnc.username : "";
    $("vnc-username").textContent = user;
    show("vnc-username-field", user !== "");
    const hasPassword = typeof vnc.password === "string" && vnc.password !== "";
    const changed = secrets.vnc !== (hasPassword ? vnc.password : null);
    secrets.vnc = hasPassword ? vnc.password : null;
    show("vnc-password-field", hasPassword);
    if (changed || !hasPassword) hideSecret("vnc");
    const port = Number(vnc.port);
    const host = String(vnc.host);
    const hostPart = host.includes(":") ? "[" + host + "]" : host;
    const userPart = user !== "" ? encodeURIComponent(user) + "@" : "";
    // The host is the relay's configured public name (no spaces or control characters).
    $("vnc-link").setAttribute("href", "vnc://" + userPart + hostPart + ":" + port);
    show("vnc", true);
  }

  const STATE_TEXT = {
    active: "Ready: the build machine is connected.",
    finishing: "The build finished: remote access stays open for a grace period.",
    disconnected: "The build machine lost its link to the relay; waiting for it to come back.",
  };

  function renderInstructions(body) {
    const state = String(body.state);
    document.body.dataset.sessionState = state;
    setState("ready", STATE_TEXT[state] || ("Session state: " + state));
    setMessage("");
    renderSsh(body.ssh);
    renderVnc(body.screenshare);
    if (typeof body.available_until === "string") {
      deadline = new Date(body.available_until);
      deadlineKind = "available_until";
      $("deadline-label").textContent = "Remote access ends at ";
    } else {
      deadline = new Date(body.hard_cap);
      deadlineKind = "hard_cap";
      $("deadline-label").textContent = "Open while the build runs, at most until ";
    }
    if (isNaN(deadline.getTime())) deadline = null;
    $("deadline").dataset.kind = deadlineKind;
    if (deadline) {
      $("deadline-time").setAttribute("datetime", deadline.toISOString());
      $("deadline-time").textContent = deadline.toLocaleString();
    }
    show("deadline", deadline !== null);
    tick();
  }

  function formatLeft(ms) {
    if (ms <= 0) return "(ending now)";
    let s = Math.floor(ms / 1000);
    const h = Math.floor(s / 3600); s -= h * 3600;
    const m = Math.floor(s / 60); s -= m * 60;
    const parts = [];
    if (h > 0) parts.push(h + "h");
    if (h > 0 || m > 0) parts.push(m + "m");
    parts.push(s + "s");
    return "(in " + parts.join(" ") + ")";
  }

  function tick() {
    if (!deadline) { $("countdown").textContent = ""; return; }
    $("countdown").textContent = " " + formatLeft(deadline.getTime() - Date.now());
  }

  // A final answer: stop polling.
  function stop(state, text, message) {
    clearInstructions();
    setState(state, text);
    setMessage(message);
    if (timer !== null) { clearTimeout(timer); timer = null; }
  }

  function schedule(ms) {
    if (timer !== null) clearTimeout(timer);
    timer = setTimeout(poll, ms);
  }

  function backoff() {
    errors += 1;
    return Math.min(WAIT_MS * Math.pow(2, errors - 1), MAX_BACKOFF_MS);
  }

  async function poll() {
    timer = null;
    const mine = generation;
    let response;
    let body = null;
    try {
      response = await fetch("/v1/sessions/" + encodeURIComponent(sessionId) + "/instructions", {
        headers: { "Authorization": "Bearer " + token },
        cache: "no-store",
        credentials: "omit",
        referrerPolicy: "no-referrer",
      });
      try { body = await response.json(); } catch (_) { body = null; }
    } catch (_) {
      if (mine !== generation) return;
      const wait = backoff();
      setState("offline", "Cannot reach the relay; retrying in " + Math.round(wait / 1000) + " s.");
      schedule(wait);
      return;
    }
    if (mine !== generation) return;
    const message = body && typeof body.message === "string" ? body.message : "";
    switch (response.status) {
      case 200:
        errors = 0;
        renderInstructions(body || {});
        schedule(POLL_MS);
        return;
      case 409:
        errors = 0;
        clearInstructions();
        setState("waiting", "Waiting for the build machine to connect…");
        setMessage(message);
        schedule(WAIT_MS);
        return;
      case 401:
        stop("unauthorized", "This link has expired or is not valid: open remote access from the CI again.", message);
        return;
      case 403:
        if (message === DENIED_MESSAGE) {
          stop("denied", "Remote access is not available to you.", message);
        } else {
          stop("forbidden", "This link is not for this build's app.", message);
        }
        return;
      case 404:
        stop("unknown", "There is no such remote access session.", message);
        return;
      case 410:
        stop("ended", "Remote access to this build has ended.", message);
        return;
      default: {
        const wait = backoff();
        setState("error", "The relay answered " + response.status + "; retrying in " +
          Math.round(wait / 1000) + " s.");
        setMessage(message);
        schedule(wait);
      }
    }
  }

  function feedback(text) {
    const el = $("copied");
    el.textContent = "";
    // A fresh text node so screen readers announce a repeated message.
    setTimeout(() => { el.textContent = text; }, 50);
  }

  async function copyText(text, what) {
    try {
      await navigator.clipboard.writeText(text);
      feedback(what + " copied.");
    } catch (_) {
      feedback("Could not copy the " + what.toLowerCase() + ": select it and copy it by hand.");
    }
  }

  function wire() {
    for (const button of document.querySelectorAll("button.copy")) {
      button.addEventListener("click", () => {
        const source = $(button.dataset.copy);
        copyText(source.textContent, button.textContent.replace(/^Copy /, "").replace(/^./, (c) => c.toUpperCase()));
      });
    }
    for (const button of document.querySelectorAll("button.reveal")) {
      button.addEventListener("click", () => {
        const kind = button.dataset.secret;
        if (button.getAttribute("aria-pressed") === "true") hideSecret(kind); else revealSecret(kind);
      });
    }
    for (const button of document.querySelectorAll("button.copy-secret")) {
      button.addEventListener("click", () => {
        const kind = button.dataset.secret;
        if (secrets[kind] !== null) copyText(secrets[kind], "Password");
      });
    }
  }

  // Starts (or restarts, for a new token) polling.
  function begin() {
    generation += 1;
    if (timer !== null) { clearTimeout(timer); timer = null; }
    errors = 0;
    clearInstructions();
    setMessage("");
    if (token === "") {
      stop("unauthorized", "This link has no token: open remote access from the CI again.", "");
      return;
    }
    setState("loading", "Loading the remote access instructions…");
    poll();
  }

  function start() {
    wire();
    ticker = setInterval(tick, 1000);
    // A link with another token changes only the fragment: no new document is loaded.
    window.addEventListener("hashchange", () => {
      const next = tokenOf();
      if (next !== token) { token = next; begin(); }
    });
    begin();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
