// latticewatch live dashboard: plain JS + inline SVG, no libraries, no network beyond this daemon.
// Data: GET /api/state once, then server-sent events (/events) carrying the same snapshot.
// Each chart writes what it drew into data-* attributes (handy for tests and for debugging).
"use strict";
(function () {
  const COLOURS = { stacking_fault: "#d55e00", no_stacking_fault: "#009e73", misoriented: "#56b4e9",
    agglomeration: "#e69f00", empty: "#cc79a7", uncertain: "#999999", unclassified: "#f0e442" };
  const NS = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);
  const colour = (c) => COLOURS[c] || "#999";
  const label = (c) => c.replace(/_/g, " ");

  function el(tag, attrs, text) {
    const e = document.createElementNS(NS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function clear(svg) { while (svg.firstChild) svg.removeChild(svg.firstChild); }
  function box(svg) { const v = svg.viewBox.baseVal; return { w: v.width, h: v.height, l: 34, r: 8, t: 8, b: 22 }; }
  function empty(svg, text) {
    const b = box(svg); clear(svg); svg.setAttribute("data-points", "0");
    svg.appendChild(el("text", { x: b.w / 2, y: b.h / 2, "text-anchor": "middle", class: "empty" }, text || "waiting for frames…"));
  }
  function axes(svg, b, yMax, yFmt) {
    svg.appendChild(el("line", { x1: b.l, y1: b.h - b.b, x2: b.w - b.r, y2: b.h - b.b, class: "axis" }));
    svg.appendChild(el("line", { x1: b.l, y1: b.t, x2: b.l, y2: b.h - b.b, class: "axis" }));
    for (const f of [0, 0.5, 1]) {
      const y = b.h - b.b - f * (b.h - b.t - b.b);
      svg.appendChild(el("text", { x: b.l - 4, y: y + 3, "text-anchor": "end" }, yFmt(f * yMax)));
      if (f > 0) svg.appendChild(el("line", { x1: b.l, y1: y, x2: b.w - b.r, y2: y, class: "axis", "stroke-dasharray": "2 3" }));
    }
  }
  const pct = (v) => (v * 100).toFixed(0) + "%";
  const num = (v) => (v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(v === 0 ? 0 : 2));

  function drawDefect(series) {
    const svg = $("chart-defect");
    const pts = series.filter((s) => s.defect_fraction !== null);
    if (!series.length) return empty(svg);
    const b = box(svg); clear(svg); axes(svg, b, 1, pct);
    const n = series.length, x = (i) => b.l + (n > 1 ? i / (n - 1) : 0.5) * (b.w - b.l - b.r);
    const y = (v) => b.h - b.b - v * (b.h - b.t - b.b);
    svg.setAttribute("data-band-points", String(drawBand(svg, series, x, y)));
    series.forEach((s, i) => {
      if (s.defect_fraction !== null) svg.appendChild(el("circle", { cx: x(i), cy: y(s.defect_fraction), r: 2.2, fill: COLOURS.stacking_fault, opacity: 0.55 }));
    });
    let d = "";
    series.forEach((s, i) => { if (s.rolling !== null) d += (d ? "L" : "M") + x(i).toFixed(1) + "," + y(s.rolling).toFixed(1); });
    if (d) svg.appendChild(el("path", { d: d, fill: "none", stroke: "#f5f5f5", "stroke-width": 1.6, "vector-effect": "non-scaling-stroke" }));
    // particle count per frame, faint, on its own scale: shows empty areas at a glance
    const maxP = Math.max(1, ...series.map((s) => s.particles));
    let p = "";
    series.forEach((s, i) => { p += (p ? "L" : "M") + x(i).toFixed(1) + "," + y(s.particles / maxP).toFixed(1); });
    svg.appendChild(el("path", { d: p, fill: "none", stroke: "#56b4e9", "stroke-width": 1, opacity: 0.35, "vector-effect": "non-scaling-stroke" }));
    // frames outside the model's domain: marked on the time axis, left out of the defect fraction
    let ood = 0;
    series.forEach((s, i) => {
      if (!s.out_of_domain) return;
      ood++;
      svg.appendChild(el("text", { x: x(i), y: b.h - b.b - 2, "text-anchor": "middle", class: "ood-mark", fill: "#d55e00" }, "✕"));
    });
    svg.setAttribute("data-ood-points", String(ood));
    svg.appendChild(el("text", { x: b.w - b.r, y: b.h - 6, "text-anchor": "end" }, n + " frames (blue: particles/frame, max " + maxP + ")"));
    if (!pts.length) svg.appendChild(el("text", { x: b.w / 2, y: b.h / 2, "text-anchor": "middle", class: "empty" }, "no oriented particles yet"));
    svg.setAttribute("data-points", String(n));
    svg.setAttribute("data-defect-points", String(pts.length));
  }

  // the rolling estimate's 95 % interval, shaded: one polygon per run of frames that have one
  function drawBand(svg, series, x, y) {
    let run = [], drawn = 0;
    const flush = () => {
      if (!run.length) return;
      const edge = (i, v) => x(i).toFixed(1) + "," + y(v).toFixed(1);
      const upper = run.map((i) => edge(i, series[i].rolling_interval.upper));
      const lower = run.slice().reverse().map((i) => edge(i, series[i].rolling_interval.lower));
      svg.appendChild(el("polygon", { points: upper.concat(lower).join(" "), class: "band" }));
      drawn += run.length; run = [];
    };
    series.forEach((s, i) => { if (s.rolling_interval && s.rolling_interval.lower !== null) run.push(i); else flush(); });
    flush();
    return drawn;
  }

  function drawClasses(totals) {
    const svg = $("chart-classes");
    const names = Object.keys(totals).filter((c) => totals[c] > 0 || c in COLOURS);
    const max = Math.max(0, ...names.map((c) => totals[c]));
    svg.setAttribute("data-counts", JSON.stringify(totals));
    if (!max) { empty(svg, "no particles yet"); svg.setAttribute("data-counts", JSON.stringify(totals)); return; }
    const b = { w: 420, h: 200, l: 112, r: 40, t: 6, b: 6 }; clear(svg);
    const rowH = (b.h - b.t - b.b) / names.length;
    names.forEach((c, i) => {
      const w = (totals[c] / max) * (b.w - b.l - b.r), yy = b.t + i * rowH;
      svg.appendChild(el("text", { x: b.l - 6, y: yy + rowH / 2 + 3, "text-anchor": "end" }, label(c)));
      svg.appendChild(el("rect", { x: b.l, y: yy + rowH * 0.15, width: Math.max(w, totals[c] ? 1 : 0), height: rowH * 0.7, fill: colour(c), "data-class": c, "data-count": totals[c] }));
      svg.appendChild(el("text", { x: b.l + w + 4, y: yy + rowH / 2 + 3 }, String(totals[c])));
    });
    svg.setAttribute("data-points", String(names.length));
  }

  function drawSizes(sizes, unit) {
    const svg = $("chart-sizes");
    $("size-unit").textContent = "equivalent diameter, " + unit;
    if (!sizes.edges.length) return empty(svg);
    const n = sizes.edges.length - 1, classes = Object.keys(sizes.counts);
    const stacks = Array.from({ length: n }, (_, i) => classes.reduce((a, c) => a + sizes.counts[c][i], 0));
    const max = Math.max(1, ...stacks);
    const b = box(svg); clear(svg); axes(svg, b, max, (v) => v.toFixed(0));
    const bw = (b.w - b.l - b.r) / n, y = (v) => (v / max) * (b.h - b.t - b.b);
    let bars = 0;
    for (let i = 0; i < n; i++) {
      let base = 0;
      for (const c of classes) {
        const v = sizes.counts[c][i]; if (!v) continue;
        svg.appendChild(el("rect", { x: b.l + i * bw + 1, y: b.h - b.b - y(base + v), width: Math.max(bw - 2, 1), height: y(v), fill: colour(c) }));
        base += v; bars++;
      }
    }
    xLabels(svg, b, sizes.edges);
    svg.setAttribute("data-points", String(bars));
    svg.setAttribute("data-bins", JSON.stringify(sizes.counts));
  }

  function xLabels(svg, b, edges) {
    const n = edges.length - 1, bw = (b.w - b.l - b.r) / n, every = Math.ceil(n / 8);
    for (let i = 0; i <= n; i += every)
      svg.appendChild(el("text", { x: b.l + i * bw, y: b.h - 8, "text-anchor": "middle" }, num(edges[i])));
  }

  function drawSizeDefect(sizes) {
    const svg = $("chart-sizedefect");
    const fr = sizes.defect_fraction || [], ci = sizes.defect_interval || [];
    if (!sizes.edges.length || !fr.some((v) => v !== null)) return empty(svg, sizes.edges.length ? "no oriented particles yet" : undefined);
    const n = sizes.edges.length - 1, b = box(svg); clear(svg); axes(svg, b, 1, pct);
    const bw = (b.w - b.l - b.r) / n, h = b.h - b.t - b.b;
    let bars = 0;
    fr.forEach((v, i) => {
      if (v === null) return;
      svg.appendChild(el("rect", { x: b.l + i * bw + 1, y: b.h - b.b - v * h, width: Math.max(bw - 2, 1), height: Math.max(v * h, 1), fill: COLOURS.stacking_fault, opacity: 0.85 }));
      const cx = b.l + (i + 0.5) * bw;
      if (ci[i] && ci[i].lower !== null)  // the bin's 95 % interval as a whisker
        svg.appendChild(el("line", { x1: cx, x2: cx, y1: b.h - b.b - ci[i].lower * h, y2: b.h - b.b - ci[i].upper * h, class: "whisker" }));
      svg.appendChild(el("text", { x: cx, y: b.h - b.b - v * h - 3, "text-anchor": "middle" }, "n=" + sizes.oriented[i]));
      bars++;
    });
    xLabels(svg, b, sizes.edges);
    svg.setAttribute("data-points", String(bars));
  }

  function drawLatency(lat, budgetMs) {
    const svg = $("chart-latency");
    const rec = lat.recent.filter((r) => r.latency_s !== null);
    if (!rec.length) return empty(svg, "waiting for runner timings…");
    const budget = budgetMs ? budgetMs / 1000 : 0;
    const max = Math.max(budget * 1.1, ...rec.map((r) => r.latency_s)) || 1;
    const b = box(svg); clear(svg); axes(svg, b, max, (v) => v.toFixed(v < 1 ? 2 : 1) + "s");
    const n = rec.length, x = (i) => b.l + (n > 1 ? i / (n - 1) : 0.5) * (b.w - b.l - b.r);
    const y = (v) => b.h - b.b - (v / max) * (b.h - b.t - b.b);
    let dl = "", ds = "";
    rec.forEach((r, i) => {
      dl += (dl ? "L" : "M") + x(i).toFixed(1) + "," + y(r.latency_s).toFixed(1);
      ds += (ds ? "L" : "M") + x(i).toFixed(1) + "," + y(r.service_s).toFixed(1);
      if (r.overrun) svg.appendChild(el("circle", { cx: x(i), cy: y(r.latency_s), r: 3, fill: "#d55e00" }));
    });
    svg.appendChild(el("path", { d: ds, fill: "none", stroke: "#009e73", "stroke-width": 1.2 }));
    svg.appendChild(el("path", { d: dl, fill: "none", stroke: "#56b4e9", "stroke-width": 1.6 }));
    if (budget) svg.appendChild(el("line", { x1: b.l, y1: y(budget), x2: b.w - b.r, y2: y(budget), stroke: "#e69f00", "stroke-dasharray": "5 4" }));
    svg.appendChild(el("text", { x: b.w - b.r, y: b.t + 10, "text-anchor": "end" }, "blue: arrival→done, green: processing"));
    svg.setAttribute("data-points", String(n));
  }

  function drawErrors(errors, totals) {
    const ul = $("errors"); ul.textContent = "";
    $("error-count").textContent = totals.errors + " error(s), " + totals.warnings + " warning(s)";
    ul.setAttribute("data-count", String(errors.length));
    if (!errors.length) { const li = document.createElement("li"); li.className = "none"; li.textContent = "none"; ul.appendChild(li); return; }
    for (const e of errors) {
      const li = document.createElement("li"); li.className = "type-" + e.type;
      li.textContent = (e.at ? e.at.replace("T", " ").slice(0, 19) + "  " : "") + e.type + "  " + (e.frame_id || "") + ": " + e.problem;
      li.title = e.origin || ""; ul.appendChild(li);
    }
  }

  function drawKpis(s) {
    $("kpi-frames").textContent = s.totals.frames;
    $("kpi-particles").textContent = s.totals.particles;
    const ood = $("kpi-ood");
    ood.textContent = s.totals.out_of_domain;
    ood.className = "value" + (s.totals.out_of_domain ? " ood" : "");
    $("kpi-fps").textContent = s.throughput_fps.toFixed(2) + " fps";
    const l = s.latency;
    $("kpi-latency").textContent = l.p50_s === null ? "–" : l.p50_s.toFixed(2) + " / " + l.max_s.toFixed(2) + " s";
    $("kpi-budget").textContent = (s.budget_ms ? (s.budget_ms / 1000).toFixed(1) + " s" : "none") + " / " + s.totals.overruns;
    const v = $("kpi-verdict");
    v.className = "value" + (s.verdict ? " " + s.verdict.verdict : "");
    v.textContent = s.verdict ? s.verdict.verdict : "–";
    v.title = s.rule + (s.verdict ? " — " + s.verdict.frame_id : "");
  }

  function drawThumb(t) {
    const img = $("thumb");
    if (t.version && String(t.version) !== img.getAttribute("data-version")) {
      img.src = "thumbnail.png?v=" + t.version;
      img.setAttribute("data-version", String(t.version));
      img.setAttribute("data-frame", t.frame_id);
      const ood = t.out_of_domain && t.out_of_domain.length;
      img.className = ood ? "ood" : "";
      img.setAttribute("data-out-of-domain", ood ? "true" : "false");
      $("thumb-id").textContent = t.frame_id + (ood ? " — out of model domain: " + t.out_of_domain.join("; ") : "");
      $("thumb-id").className = "note" + (ood ? " ood-note" : "");
    }
  }

  function legend() {
    const div = $("legend");
    for (const c in COLOURS) { const s = document.createElement("span"); s.style.setProperty("--c", COLOURS[c]); s.textContent = label(c); div.appendChild(s); }
  }

  let lastVersion = -1;
  function render(s) {
    if (s.version === lastVersion) return;
    lastVersion = s.version;
    const steps = [() => drawKpis(s), () => drawDefect(s.series), () => drawClasses(s.class_totals), () => drawSizes(s.sizes, s.size_unit),
      () => drawSizeDefect(s.sizes), () => drawLatency(s.latency, s.budget_ms), () => drawErrors(s.errors, s.totals), () => drawThumb(s.thumbnail)];
    for (const f of steps) { try { f(); } catch (err) { console.error(err); } }  // one broken chart leaves the others
    document.body.setAttribute("data-version", String(s.version));
    document.body.setAttribute("data-frames", String(s.totals.frames));
  }

  function connect() {
    const conn = $("conn");
    if (!window.EventSource) { conn.textContent = "no EventSource: polling"; setInterval(poll, 2000); return; }
    // ?sse_max_s=N: the server ends each stream after N s and the browser reconnects (headless tests)
    const maxS = new URLSearchParams(location.search).get("sse_max_s");
    const es = new EventSource("events" + (maxS ? "?max_s=" + encodeURIComponent(maxS) : ""));
    let messages = 0;
    es.addEventListener("snapshot", (m) => {
      conn.textContent = "live"; conn.className = "conn live";
      document.body.setAttribute("data-sse-messages", String(++messages));
      render(JSON.parse(m.data));
    });
    es.onerror = () => { if (!maxS) { conn.textContent = "reconnecting…"; conn.className = "conn down"; } };
  }
  function poll() { fetch("api/state").then((r) => r.json()).then(render).catch(() => {}); }

  legend();
  fetch("api/state").then((r) => r.json()).then(render).catch(() => {}).finally(connect);
})();
