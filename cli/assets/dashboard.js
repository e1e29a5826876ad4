// taskgraph dashboard: the page's script. Read-only: it only reads the server's event
// stream (/api/job/<job>/events) and the jobs list (/api/jobs); nothing here changes a job.
"use strict";

const PAGE_SIZE = 50;
const HEALTHS = ["healthy", "degraded", "down", "stalled", "finished"];

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function setConnection(text) {
  const c = document.getElementById("connection");
  if (!c) return;
  c.hidden = !text;
  c.textContent = text || "";
}

// ---------------------------------------------------------------- jobs list

function jobsPage() {
  const tbody = document.querySelector("#jobs tbody");
  async function load() {
    try {
      const r = await fetch("/api/jobs", { cache: "no-store" });
      const a = await r.json();
      setConnection(a.error ? a.error + " — retrying" : "");
      tbody.replaceChildren();
      for (const j of a.jobs) {
        const tr = el("tr", { "data-job": j.job });
        const td = el("td");
        td.append(el("a", { href: "/job/" + encodeURIComponent(j.job) }, j.job));
        tr.append(td, el("td", {}, j.state), el("td", {}, j.epoch ?? "–"),
          el("td", {}, j.tasks ?? "–"), el("td", {}, j.replicas ?? "–"));
        tbody.append(tr);
      }
      document.getElementById("no-jobs").hidden = a.jobs.length > 0 || !!a.error;
    } catch (e) {
      setConnection("dashboard server unreachable — retrying");
    }
  }
  load();
  setInterval(load, 2000);
}

// ---------------------------------------------------------------- one job

function jobPage() {
  const job = decodeURIComponent(location.pathname.split("/")[2] || "");
  document.title = job + " — taskgraph";
  document.getElementById("job-name").textContent = job;
  const state = {
    view: null,
    tasks: [],
    page: 0,
    filter: "all",
    marked: null,
    rendered: new Map(), // task -> "health|title" drawn in the picture
  };

  const timeline = document.getElementById("timeline");
  const showCk = document.getElementById("show-checkpoints");
  const syncCk = () => timeline.classList.toggle("hide-checkpoints", !showCk.checked);
  showCk.addEventListener("change", syncCk);
  syncCk();
  document.getElementById("filter").addEventListener("change", (e) => {
    state.filter = e.target.value; state.page = 0; renderTable();
  });
  document.getElementById("prev").addEventListener("click", () => { state.page = Math.max(0, state.page - 1); renderTable(); });
  document.getElementById("next").addEventListener("click", () => { state.page += 1; renderTable(); });
  document.getElementById("picture").addEventListener("click", (e) => {
    const g = e.target.closest && e.target.closest("g.task");
    if (g) mark(Number(g.dataset.task));
  });
  document.querySelector("#tasks tbody").addEventListener("click", (e) => {
    const tr = e.target.closest("tr[data-task]");
    if (tr) mark(Number(tr.dataset.task));
  });

  function holdersText(t) {
    const p = t.holders.find((h) => h.slot === 0);
    const lines = ["task " + t.task + ": " + t.health];
    lines.push(p ? "primary " + p.node + " (term " + p.revision + ") at " + p.addr : "no primary");
    for (const h of t.holders.filter((h) => h.slot > 0)) {
      lines.push("backup " + h.slot + ": " + h.node + " (since revision " + h.revision + ")");
    }
    return lines.join("\n");
  }

  function visibleTasks() {
    return state.filter === "unhealthy" ? state.tasks.filter((t) => t.health !== "healthy") : state.tasks;
  }

  function renderTable() {
    const rows = visibleTasks();
    const pages = Math.max(1, Math.ceil(rows.length / PAGE_SIZE));
    state.page = Math.min(state.page, pages - 1);
    document.getElementById("page").textContent = "page " + (state.page + 1) + " of " + pages + " (" + rows.length + " tasks)";
    const tbody = document.querySelector("#tasks tbody");
    tbody.replaceChildren();
    for (const t of rows.slice(state.page * PAGE_SIZE, (state.page + 1) * PAGE_SIZE)) {
      const tr = el("tr", { "data-task": t.task, "data-health": t.health, "data-primary": t.primary || "", "data-term": t.term ?? "" });
      if (state.marked === t.task) tr.classList.add("marked");
      const backups = t.holders.filter((h) => h.slot > 0).map((h) => h.node).join(", ");
      tr.append(el("td", {}, t.task), el("td", { class: "health h-" + t.health }, t.health),
        el("td", { class: "primary" }, t.primary ? t.primary + " (" + t.term + ")" : "–"),
        el("td", { class: "backups" }, backups || "–"));
      tbody.append(tr);
    }
  }

  // Tasks with a recent failover: task -> until when (ms) they are ringed.
  const recent = new Map();
  function renderRecent() {
    const now = Date.now();
    for (const [t, until] of recent) {
      const g = document.getElementById("task-" + t);
      if (g) g.classList.toggle("recent", until > now);
      if (until <= now) recent.delete(t);
    }
  }
  setInterval(renderRecent, 1000);

  function renderPicture() {
    for (const t of state.tasks) {
      const key = t.health + "|" + holdersText(t);
      if (state.rendered.get(t.task) === key) continue;
      const g = document.getElementById("task-" + t.task);
      if (!g) continue;
      g.setAttribute("class", "task h-" + t.health + (state.marked === t.task ? " marked" : "") +
        ((recent.get(t.task) || 0) > Date.now() ? " recent" : ""));
      const title = g.querySelector("title");
      if (title) title.textContent = holdersText(t);
      state.rendered.set(t.task, key);
    }
  }

  function renderDetail() {
    const d = document.getElementById("detail");
    const t = state.tasks.find((x) => x.task === state.marked);
    if (!t) { d.hidden = true; return; }
    d.hidden = false;
    d.replaceChildren(el("h2", {}, "Task " + t.task));
    const dl = el("dl");
    const add = (k, v) => dl.append(el("dt", {}, k), el("dd", {}, v));
    add("health", t.health);
    const p = t.holders.find((h) => h.slot === 0);
    add("primary", p ? p.node + " — term " + p.revision + " — " + p.addr : "none");
    for (const h of t.holders.filter((h) => h.slot > 0)) {
      add("backup " + h.slot, h.node + " — since revision " + h.revision + " — " + h.addr);
    }
    d.append(dl);
  }

  function mark(task) {
    state.marked = task;
    for (const g of document.querySelectorAll("#picture g.task.marked")) g.classList.remove("marked");
    const g = document.getElementById("task-" + task);
    if (g) g.classList.add("marked");
    // Show the task's row: its page, unfiltered if need be.
    let rows = visibleTasks();
    if (!rows.some((t) => t.task === task)) { state.filter = "all"; document.getElementById("filter").value = "all"; rows = state.tasks; }
    const i = rows.findIndex((t) => t.task === task);
    if (i >= 0) state.page = Math.floor(i / PAGE_SIZE);
    renderTable();
    renderDetail();
    document.body.dataset.marked = String(task);
  }

  function renderProgress(v) {
    document.getElementById("epoch").textContent = v.epoch ?? "–";
    document.getElementById("rate").textContent = v.rate ? v.rate.toFixed(1) : "0";
    const d = v.durations_ms || [];
    const max = Math.max(1, ...d);
    const pts = d.map((ms, i) => (i * 160 / Math.max(1, d.length - 1)).toFixed(1) + "," + (26 - ms * 24 / max).toFixed(1)).join(" ");
    document.querySelector("#spark polyline").setAttribute("points", pts);
    document.getElementById("last-duration").textContent = d.length ? d[d.length - 1] + " ms" : "";
    const counts = document.getElementById("counts");
    counts.replaceChildren();
    for (const h of HEALTHS) {
      const n = v.counts ? v.counts[h] : 0;
      if (n || h === "healthy") {
        const s = el("span", { "data-health": h, class: "count" });
        s.append(el("span", { class: "dot h-" + h }), document.createTextNode(n + " " + h));
        counts.append(s);
      }
    }
    document.body.dataset.healthy = v.counts ? v.counts.healthy : 0;
  }

  function renderState(v) {
    const s = document.getElementById("job-state");
    let text;
    if (v.exists === false) text = "no such job";
    else if (v.finished) text = "finished at epoch " + v.epoch;
    else if (v.stalls && v.stalls.length) text = "stalled at epoch " + v.epoch;
    else if (v.epoch !== null && v.epoch !== undefined) text = "running";
    else text = "connecting…";
    s.textContent = text + (v.tasks_total ? " · " + v.tasks_total + " tasks × " + v.replicas + " · " + v.nodes + " nodes" : "");
    document.body.dataset.state = v.exists === false ? "missing" : v.finished ? "finished" : "running";
    const missing = document.getElementById("missing");
    missing.hidden = v.exists !== false;
    missing.textContent = v.exists === false ? "Job \u201c" + job + "\u201d does not exist in etcd (`taskgraph jobs` lists the jobs). This page shows it if it appears." : "";
    document.body.dataset.etcd = v.etcd;
    if (v.etcd === "reconnecting") setConnection("etcd unreachable — reconnecting…" + (v.etcd_error ? " (" + v.etcd_error + ")" : ""));
    else if (v.etcd === "connecting") setConnection("connecting to etcd…");
    else setConnection("");
    const stall = document.getElementById("stall");
    stall.hidden = !(v.stalls && v.stalls.length);
    if (!stall.hidden) {
      const longest = Math.max(...v.stalls.map((s) => s.for_ms)) / 1000;
      stall.textContent = "Stalled at epoch " + v.epoch + " for " + longest.toFixed(1) + " s: " +
        (v.stall_reasons.length ? v.stall_reasons.join("; ") : "no cause seen by the reporting nodes");
    }
    document.getElementById("picture-note").textContent = v.picture_note || "";
    document.getElementById("spares").textContent = v.spares && v.spares.length ? "spares waiting: " + v.spares.join(", ") : "";
    if (v.garbage && v.garbage.length) {
      document.getElementById("picture-note").textContent += (v.picture_note ? "; " : "") + "garbage in etcd: " + v.garbage.join("; ");
    }
    const rc = document.getElementById("result-card");
    rc.hidden = v.result === null || v.result === undefined;
    if (!rc.hidden) document.getElementById("result").textContent = v.result;
  }

  function addTimeline(entries) {
    for (const e of entries) {
      const li = el("li", { "data-kind": e.kind, "data-tasks": e.tasks.join(" "), "data-rev": e.rev });
      const time = new Date(e.ms).toLocaleTimeString([], { hour12: false });
      li.append(el("span", { class: "time" }, time), document.createTextNode(e.text));
      if (e.tasks.length) li.addEventListener("click", () => mark(e.tasks[0]));
      timeline.prepend(li);
      // Where a failover just happened: ringed in the picture for half a minute.
      const age = Date.now() - e.ms;
      if ((e.kind === "failover" || e.kind === "lost") && age < 30000) {
        for (const t of e.tasks) {
          recent.set(t, Math.max(recent.get(t) || 0, e.ms + 30000));
        }
      }
    }
    while (timeline.children.length > 500) timeline.lastChild.remove();
  }

  function apply(u) {
    state.view = u;
    if (u.svg !== undefined) {
      document.getElementById("picture").innerHTML = u.svg;
      state.rendered.clear();
      if (state.marked !== null) {
        const g = document.getElementById("task-" + state.marked);
        if (g) g.classList.add("marked");
      }
    }
    if (u.tasks !== undefined) {
      state.tasks = u.tasks;
      renderTable();
      if (state.marked !== null) renderDetail();
    }
    renderPicture();
    renderProgress(u);
    renderState(u);
    addTimeline(u.timeline || []);
    renderRecent();
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  }

  const es = new EventSource("/api/job/" + encodeURIComponent(job) + "/events");
  es.addEventListener("update", (m) => {
    try { apply(JSON.parse(m.data)); } catch (err) { setConnection("bad update from the server: " + err); }
  });
  es.addEventListener("refused", (m) => {
    let msg = "refused";
    try { msg = JSON.parse(m.data).error; } catch (err) { /* keep the default */ }
    const missing = document.getElementById("missing");
    missing.hidden = false;
    missing.textContent = msg;
    document.body.dataset.state = "refused";
    es.close();
  });
  es.onerror = () => {
    if (es.readyState !== EventSource.CLOSED) setConnection("dashboard server unreachable — reconnecting…");
  };
  es.onopen = () => {
    // A new stream starts with everything the server kept: start the timeline afresh.
    timeline.replaceChildren();
    state.rendered.clear();
    setConnection("");
  };
}

if (document.body.dataset.page === "jobs") jobsPage(); else jobPage();
