// lmforge chat page, agent steps: shows an agent run (the JSONL trace `lmforge agent --trace FILE` writes) in the
// chat log, each tool call and its result as a collapsible step (<details>), closed by default so the question
// and the answer stay readable. Self-contained: index.html only loads this file. Everything from the trace is
// inserted with textContent, never innerHTML: tool results may carry text planted by others (prompt injection).
"use strict";
(function () {
  const log = document.getElementById("log");
  function bubble(role, label, text) {
    document.getElementById("empty")?.remove();
    const div = document.createElement("div");
    div.className = "msg " + role;
    const who = document.createElement("span");
    who.className = "role"; who.textContent = label;
    const body = document.createElement("div");
    body.className = "text"; body.textContent = text;
    div.append(who, body);
    log.append(div);
    return div;
  }
  function step(call, result) {
    const d = document.createElement("details");
    d.className = "msg tool-step" + (result && !result.ok ? " failed" : "");
    const s = document.createElement("summary");
    s.textContent = "step " + call.step + " · " + call.name + (result ? (result.ok ? " · ok" : " · error") : "");
    const args = document.createElement("pre");
    args.className = "tool-args"; args.textContent = call.name + "(" + call.arguments + ")";
    const out = document.createElement("pre");
    out.className = "tool-result";
    out.textContent = result ? result.content + "  (" + result.seconds.toFixed(3) + " s)" : "(no result)";
    d.append(s, args, out);
    log.append(d);
  }
  function showTrace(text) {
    const events = text.split("\n").filter((l) => l.trim()).map((l) => JSON.parse(l));
    const results = {};
    for (const e of events) if (e.type === "result") results[e.id] = e;
    for (const e of events) {
      if (e.type === "start") {
        const q = [...e.messages].reverse().find((m) => m.role === "user");
        if (q) bubble("user", "You", q.content);
      } else if (e.type === "call") step(e, results[e.id]);
      else if (e.type === "end") {
        bubble(e.answer !== null ? "assistant" : "error", e.answer !== null ? "Assistant" : "Agent stopped",
               e.answer !== null ? e.answer : e.stop_reason + (e.error ? ": " + e.error : ""));
        const meta = document.createElement("div");
        meta.className = "meta";
        meta.textContent = e.stop_reason + " · " + e.steps + " steps · " + e.tokens + " tokens · " + e.seconds.toFixed(1) + " s";
        log.lastElementChild.append(meta);
      }
    }
    log.scrollTop = log.scrollHeight;
  }
  const style = document.createElement("style");
  style.textContent = ".tool-step { background: #fbfbf4; white-space: normal; } .tool-step.failed { border-color: #feb2b2; }" +
    ".tool-step summary { cursor: pointer; font-size: 13px; color: var(--muted); }" +
    ".tool-step pre { margin: 6px 0 0; white-space: pre-wrap; font-size: 13px; }";
  document.head.append(style);
  const label = document.createElement("label");
  label.htmlFor = "agent_trace"; label.textContent = "Show an agent trace (.jsonl)";
  const input = document.createElement("input");
  input.type = "file"; input.id = "agent_trace"; input.accept = ".jsonl,.json,application/json";
  input.addEventListener("change", async () => {
    const f = input.files[0];
    if (!f) return;
    try { showTrace(await f.text()); } catch (e) { bubble("error", "Error", "not an agent trace: " + e.message); }
  });
  document.querySelector("aside").append(label, input);
  window.lmforgeShowTrace = showTrace;
})();
