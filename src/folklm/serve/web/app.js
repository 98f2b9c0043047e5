// folklm web chat: plain JavaScript, no external code. Streams /v1/chat/completions
// (server-sent events) and keeps the conversation in the page.
"use strict";
const $ = (id) => document.getElementById(id);
const messages = [];
let controller = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("span");
  body.className = "content";
  body.textContent = text;
  div.append(label, body);
  $("log").append(div);
  div.scrollIntoView({ block: "end" });
  return body;
}

async function loadModels() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const data = await r.json();
    if (!r.ok) throw new Error(data.error ? data.error.message : r.statusText);
    const sel = $("model");
    sel.innerHTML = "";
    for (const m of data.data) {
      const o = document.createElement("option");
      o.value = o.textContent = m.id;
      sel.append(o);
    }
    $("status").textContent = data.data.length + " model(s) available";
  } catch (e) {
    $("status").textContent = "cannot list models: " + e.message;
  }
}

async function send(text) {
  const system = $("system").value.trim();
  messages.push({ role: "user", content: text });
  addMessage("user", text);
  const out = addMessage("assistant", "");
  const body = {
    model: $("model").value,
    messages: (system ? [{ role: "system", content: system }] : []).concat(messages),
    temperature: parseFloat($("temperature").value),
    top_p: parseFloat($("top_p").value),
    max_tokens: parseInt($("max_tokens").value, 10),
    stream: true,
  };
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  $("status").textContent = "generating...";
  let answer = "";
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error(err.error ? err.error.message : r.status + " " + r.statusText);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const c of chunk.choices) {
          if (c.delta && c.delta.content) {
            answer += c.delta.content;
            out.textContent = answer;
          }
          if (c.finish_reason) $("status").textContent = "finished: " + c.finish_reason;
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") {
      out.parentElement.classList.add("error");
      out.textContent = answer + "\n[" + e.message + "]";
      $("status").textContent = "error";
    } else {
      $("status").textContent = "stopped";
    }
  } finally {
    if (answer) messages.push({ role: "assistant", content: answer });
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

$("form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("form").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => {
  messages.length = 0;
  $("log").innerHTML = "";
  $("status").textContent = "";
});
$("api_key").addEventListener("change", loadModels);
loadModels();
