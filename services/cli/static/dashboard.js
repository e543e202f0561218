// C-LoRA dashboard: polls /api/state and draws everything itself (no libraries).
"use strict";

const POLL_MS = 1000;
const COLORS = { reward: "#1565c0", held_out: "#2e7d32" };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

function fmt(value, digits = 3) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function renderExperiments(experiments) {
  const body = document.querySelector("#experiments tbody");
  body.replaceChildren(...experiments.map((e) => el("tr", { "data-experiment-id": e.id, className: "experiment" },
    el("td", {}, e.id),
    el("td", { className: "status-" + e.status, "data-status": e.status }, e.status),
    el("td", {}, `${e.step} / ${e.steps}`),
    el("td", {}, "v" + e.version),
    el("td", {}, fmt(e.reward_mean)),
    el("td", {}, fmt(e.accuracy)),
    el("td", {}, `${fmt(e.start_accuracy)} → ${fmt(e.final_accuracy)}`),
    el("td", {}, e.train_job_queued ? "queued" : ""))));
}

function chartCanvas(container, id, name) {
  const key = `chart-${name}-${id}`;
  let canvas = document.getElementById(key);
  if (!canvas) {
    canvas = el("canvas", { id: key, width: 300, height: 150, className: "chart",
                            "data-experiment-id": id, "data-curve": name, "data-points": "0" });
    container.append(canvas);
  }
  return canvas;
}

function drawChart(canvas, points, color, label) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 28;
  ctx.clearRect(0, 0, w, h);
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, w, h);
  ctx.strokeStyle = "#ccd"; ctx.strokeRect(pad, 6, w - pad - 6, h - pad - 6);
  ctx.fillStyle = "#555"; ctx.font = "11px sans-serif";
  ctx.fillText(label, pad + 4, 18);
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const xMax = Math.max(1, ...xs), yMin = Math.min(0, ...ys), yMax = Math.max(1, ...ys);
  ctx.fillText(String(yMax.toFixed(1)), 2, 14); ctx.fillText(String(yMin.toFixed(1)), 2, h - pad);
  ctx.fillText("0", pad, h - 10); ctx.fillText(String(xMax), w - 24, h - 10);
  const x = (v) => pad + (v / xMax) * (w - pad - 10);
  const y = (v) => (h - pad) - ((v - yMin) / (yMax - yMin)) * (h - pad - 10);
  ctx.strokeStyle = color; ctx.fillStyle = color; ctx.lineWidth = 2;
  ctx.beginPath();
  points.forEach((p, i) => (i ? ctx.lineTo(x(p[0]), y(p[1])) : ctx.moveTo(x(p[0]), y(p[1]))));
  ctx.stroke();
  points.forEach((p) => { ctx.beginPath(); ctx.arc(x(p[0]), y(p[1]), 2.5, 0, 2 * Math.PI); ctx.fill(); });
  canvas.setAttribute("data-points", String(points.length));
}

function renderCurves(experiments, curves) {
  const container = document.getElementById("curves");
  for (const e of experiments) {
    let card = document.getElementById("card-" + e.id);
    if (!card) {
      card = el("div", { id: "card-" + e.id, className: "card", "data-experiment-id": e.id }, el("h3", {}, e.id));
      container.append(card);
    }
    const series = curves[e.id] || { reward: [], held_out: [] };
    drawChart(chartCanvas(card, e.id, "reward"), series.reward, COLORS.reward, "reward (mean) by step");
    drawChart(chartCanvas(card, e.id, "held_out"), series.held_out, COLORS.held_out,
              "held-out accuracy by adapter version");
  }
}

function renderEngine(workers, note) {
  const box = document.getElementById("engine");
  if (note) { box.replaceChildren(el("p", { className: "muted" }, note)); return; }
  if (!workers.length) { box.replaceChildren(el("p", { className: "muted" }, "no rollout worker is alive")); return; }
  box.replaceChildren(...workers.map((wk) => {
    const most = Math.max(1, ...wk.shared_steps.map((p) => p[1]));
    return el("div", { className: "worker", "data-worker": wk.worker },
      el("p", {}, `${wk.worker}: ${wk.decode_steps} decode steps, ${wk.generated_tokens} tokens, ` +
                  `${wk.running_rows} rows running, ${wk.adapter_loads} adapter loads`),
      wk.shared_steps.length ? el("table", {}, ...wk.shared_steps.map(([pair, steps]) =>
        el("tr", { className: "pair", "data-pair": pair },
          el("td", {}, pair.replace("|", " + ")), el("td", {}, steps),
          el("td", {}, el("span", { className: "bar", style: `width:${Math.round(200 * steps / most)}px` })))))
        : el("p", { className: "muted" }, "no decode step has held rows of two tenants yet"));
  }));
}

function renderTrainer(trainer, note) {
  const box = document.getElementById("trainer");
  const queue = trainer.queue.length ? trainer.queue.join(", ") : "empty";
  const workers = trainer.workers.map((t) => el("p", { className: "trainer", "data-worker": t.worker },
    `${t.worker}: ${t.training} job(s) in training, ${t.jobs_trained} trained, ${t.tenants} tenants in memory`));
  box.replaceChildren(el("p", { id: "train-queue" }, "train jobs queued for: " + queue), ...workers,
                      ...(note ? [el("p", { className: "muted" }, note)] : []));
}

async function poll() {
  try {
    const response = await fetch("api/state", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const state = await response.json();
    renderExperiments(state.experiments);
    renderCurves(state.experiments, state.curves);
    renderEngine(state.rollout, state.workers_note);
    renderTrainer(state.trainer, state.workers_note);
    document.getElementById("error").textContent = "";
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (error) {
    document.getElementById("error").textContent = "cannot read the cluster state: " + error.message;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
