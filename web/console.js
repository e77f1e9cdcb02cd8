// The MonsterVM web console: the VM's state and counters from GET /vm and
// GET /vm/metrics, its serial console over the WebSocket at /vm/console, and buttons
// that send PUT /vm/actions. The API serves this page, so every request is
// same-origin and carries the login cookie when the page came over TCP.
"use strict";

const POLL_INTERVAL_MS = 1000;
const CONSOLE_PROTOCOL = "monstervm-console";

const elements = {
  name: document.getElementById("vm-name"),
  state: document.getElementById("vm-state"),
  backend: document.getElementById("vm-backend"),
  vcpus: document.getElementById("vm-vcpus"),
  memory: document.getElementById("vm-memory"),
  uptime: document.getElementById("vm-uptime"),
  metrics: document.getElementById("metrics"),
  message: document.getElementById("message"),
  terminal: document.getElementById("terminal"),
  buttons: {
    pause: document.getElementById("pause"),
    resume: document.getElementById("resume"),
    stop: document.getElementById("stop"),
  },
};

let lastState = null;
let pollTimer = null;

function showMessage(text, isError) {
  elements.message.textContent = text;
  elements.message.classList.toggle("error", Boolean(isError));
}

function showState(state) {
  lastState = state;
  elements.state.textContent = state;
  elements.state.className = "state " + state;
  elements.buttons.pause.disabled = state !== "running";
  elements.buttons.resume.disabled = state !== "paused";
  elements.buttons.stop.disabled = !["running", "paused", "starting"].includes(state);
}

function formatSeconds(seconds) {
  const whole = Math.floor(seconds);
  const hours = Math.floor(whole / 3600);
  const minutes = Math.floor((whole % 3600) / 60);
  const rest = whole % 60;
  const pad = (n) => String(n).padStart(2, "0");
  return hours > 0 ? `${hours}:${pad(minutes)}:${pad(rest)}` : `${minutes}:${pad(rest)}`;
}

async function fetchJson(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) {
    throw new Error(`GET ${path} returned ${response.status}`);
  }
  return response.json();
}

function count(value) {
  return value.toLocaleString("en");
}

function showMetrics(metrics) {
  const parts = [];
  if (metrics.exits) {
    const { pio, mmio, halt } = metrics.exits;
    parts.push(`exits: ${count(pio)} port I/O, ${count(mmio)} MMIO, ${count(halt)} HLT`);
  }
  if (metrics.instructions) {
    parts.push(`${count(metrics.instructions)} instructions`);
  }
  const serial = metrics.serial;
  parts.push(`serial: ${count(serial.bytes_out)} bytes out, ${count(serial.bytes_in)} in, ${serial.viewers} viewer(s)`);
  elements.metrics.textContent = parts.join(" · ");
}

async function poll() {
  try {
    const info = await fetchJson("/vm");
    elements.name.textContent = info.name;
    document.title = `${info.name} · MonsterVM console`;
    elements.backend.textContent = info.backend;
    elements.vcpus.textContent = info.vcpus;
    elements.memory.textContent = `${info.memory_mib} MiB`;
    elements.uptime.textContent = formatSeconds(info.uptime_secs);
    showState(info.state);
    showMetrics(await fetchJson("/vm/metrics"));
  } catch (error) {
    // The VMM process exits when the VM ends, so a VM that was stopping is now stopped.
    if (lastState === "stopping" || lastState === "stopped") {
      showState("stopped");
      showMessage("The VM stopped and its VMM process exited.");
      clearInterval(pollTimer);
    } else {
      showState("unreachable");
      showMessage(`The API is unreachable: ${error.message}`, true);
    }
  }
}

async function sendAction(action) {
  try {
    const response = await fetch("/vm/actions", {
      method: "PUT",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ action }),
    });
    if (response.ok) {
      showMessage(`${action} requested`);
      // The API accepted the stop, so the VM is stopping even if its VMM exits before
      // the next poll can report it.
      if (action === "stop") {
        showState("stopping");
      }
    } else {
      const body = await response.json().catch(() => ({}));
      showMessage(body.error || `${action} failed with status ${response.status}`, true);
    }
  } catch (error) {
    showMessage(`${action} failed: ${error.message}`, true);
  }
  poll();
}

// A terminal of plain text for builds without xterm.js: it drops escape sequences and
// turns keys into the bytes a VT100 sends.
function createPlainTerminal(container) {
  const screen = document.createElement("pre");
  screen.className = "plain-terminal";
  screen.tabIndex = 0;
  container.appendChild(screen);
  let inputHandler = () => {};
  const keys = {
    Enter: "\r", Backspace: "\x7f", Tab: "\t", Escape: "\x1b",
    ArrowUp: "\x1b[A", ArrowDown: "\x1b[B", ArrowRight: "\x1b[C", ArrowLeft: "\x1b[D",
  };
  screen.addEventListener("keydown", (event) => {
    let data = keys[event.key];
    if (event.ctrlKey && event.key.length === 1) {
      data = String.fromCharCode(event.key.toUpperCase().charCodeAt(0) & 0x1f);
    } else if (!data && event.key.length === 1) {
      data = event.key;
    }
    if (data) {
      event.preventDefault();
      inputHandler(data);
    }
  });
  const decoder = new TextDecoder();
  return {
    write(bytes) {
      const text = decoder.decode(bytes, { stream: true })
        .replace(/\x1b\[[0-9;?]*[ -\/]*[@-~]/g, "")
        .replace(/\r\n?/g, "\n");
      for (const char of text) {
        if (char === "\b") {
          screen.textContent = screen.textContent.slice(0, -1);
        } else {
          screen.textContent += char;
        }
      }
      screen.scrollTop = screen.scrollHeight;
    },
    onData(handler) { inputHandler = handler; },
    focus() { screen.focus(); },
  };
}

function createTerminal(container) {
  if (typeof Terminal === "undefined") {
    showMessage("This build has no xterm.js, so the console is a plain-text terminal.");
    return createPlainTerminal(container);
  }
  const terminal = new Terminal({ convertEol: false, cursorBlink: true, scrollback: 5000 });
  terminal.open(container);
  return terminal;
}

function connectConsole(terminal) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const socket = new WebSocket(`${scheme}://${location.host}/vm/console`, [CONSOLE_PROTOCOL]);
  socket.binaryType = "arraybuffer";
  const encoder = new TextEncoder();
  socket.addEventListener("message", (event) => {
    const data = typeof event.data === "string" ? encoder.encode(event.data) : new Uint8Array(event.data);
    terminal.write(data);
  });
  socket.addEventListener("close", () => {
    terminal.write(encoder.encode("\r\n[console disconnected]\r\n"));
    poll();
  });
  terminal.onData((data) => {
    if (socket.readyState === WebSocket.OPEN) {
      socket.send(encoder.encode(data));
    }
  });
}

for (const [action, button] of Object.entries(elements.buttons)) {
  button.addEventListener("click", () => sendAction(action));
}
showState("loading");
const terminal = createTerminal(elements.terminal);
connectConsole(terminal);
terminal.focus();
poll();
pollTimer = setInterval(poll, POLL_INTERVAL_MS);
