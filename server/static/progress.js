// One image's journey on screen: the token map filling in during the unmasking steps (the server's
// preview of the current tokens under a veil that lifts token by token), then the final image with the
// time each stage took.
//
// The stream says how many tokens are fixed at each step, not which: the veil lifts that many cells in a
// fixed shuffled order, the way MaskGIT-style sampling reveals scattered tokens.

const STAGES = [
  ["queue_wait", "queue wait"], ["text_encode", "text encode"], ["unmask", "unmasking"],
  ["residual", "residual head"], ["decode", "decode"], ["image_encode", "image encode"],
];

function seconds(s) {
  return s < 1 ? `${(s * 1000).toFixed(1)} ms` : `${s.toFixed(2)} s`;
}

// A fixed pseudo-random permutation of 0..n-1 (mulberry32-driven Fisher-Yates).
function shuffled(n) {
  let state = 0x9e3779b9;
  const random = () => {
    state = (state + 0x6d2b79f5) | 0;
    let t = Math.imul(state ^ (state >>> 15), 1 | state);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const order = Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [order[i], order[j]] = [order[j], order[i]];
  }
  return order;
}

// 1st, 2nd, 3rd, 4th, ..., 11th, 12th, 13th, ..., 21st, 22nd, ...
function ordinal(n) {
  const suffix = n % 100 >= 11 && n % 100 <= 13 ? "th" : { 1: "st", 2: "nd", 3: "rd" }[n % 10] || "th";
  return `${n}${suffix}`;
}

// The caption while the request waits in the server's queue: its place (1 = next to be admitted) and the
// images waiting in all (its own included).
export function queuedText(position, rows) {
  const place = position === 1 ? "next in line" : `${ordinal(position)} in line`;
  return `Queued: ${place} (${rows} ${rows === 1 ? "image" : "images"} waiting)`;
}

export class Viewer {
  constructor(root) {
    this.root = root;
    this.frame = root.querySelector(".v-frame");
    this.preview = root.querySelector(".v-preview");
    this.tokens = root.querySelector(".v-tokens");
    this.result = root.querySelector(".v-result");
    this.bar = root.querySelector(".v-bar");
    this.caption = root.querySelector(".v-caption");
    this.timings = root.querySelector(".v-timings");
    this.events = 0;
    this.place = null;
  }

  // What streamImages calls per event.
  listener() {
    return { progress: (ev) => this.progress(ev), queued: (ev) => this.queued(ev) };
  }

  set state(value) {
    this.root.dataset.state = value; // empty, waiting, running, done, failed (CSS shows the right layer)
  }

  // Back to empty (no image yet) at the given size.
  reset(width, height) {
    this.start(width, height);
    this.kept = null;
    this.result.removeAttribute("src");
    this.timings.replaceChildren();
    this.caption.textContent = "";
    this.state = "empty";
  }

  // A new request: the frame waits for the first step. The previous image stays (hidden) until the first
  // progress event, so a request refused at once (400, 429, 503) leaves it on screen.
  start(width, height) {
    this.width = width;
    this.height = height;
    this.grid = null;
    this.events = 0;
    this.place = null;
    this.root.dataset.progressEvents = "0";
    this.root.dataset.queuedEvents = "0";
    this.kept = this.root.dataset.state !== "done" ? null
      : { caption: this.caption.textContent, aspect: this.frame.style.aspectRatio };
    this.frame.style.aspectRatio = `${width} / ${height}`;
    this.preview.removeAttribute("src");
    this.bar.value = 0;
    this.caption.textContent = "Waiting for the server…";
    this.state = "waiting";
  }

  // A `queued` event: the request's place in the server's queue, sent again when the place or the count of
  // waiting rows changes. The caption (a polite live region) changes only with the place, so a screen reader
  // is not told the same place again each time someone joins the queue behind it.
  queued(ev) {
    if (this.events > 0) return; // its first step is done: the steps say more than the place of other rows
    const position = Number(ev.position);
    const rows = Number(ev.queued_rows);
    if (!Number.isInteger(position) || position < 1 || !Number.isInteger(rows)) return;
    this.root.dataset.queuedEvents = String(Number(this.root.dataset.queuedEvents || 0) + 1);
    if (position === this.place) return;
    this.place = position;
    this.caption.textContent = queuedText(position, rows);
  }

  progress(ev) {
    if (this.events === 0) {
      this.kept = null;
      this.result.removeAttribute("src");
      this.timings.replaceChildren();
    }
    this.events += 1;
    this.root.dataset.progressEvents = String(this.events);
    this.bar.max = ev.steps;
    this.bar.value = ev.step;
    this.caption.textContent = `Step ${ev.step} of ${ev.steps} · ${ev.revealed} of ${ev.tokens} tokens revealed`;
    if (ev.preview) this.preview.src = `data:image/png;base64,${ev.preview}`;
    this.drawTokens(ev.revealed, ev.tokens);
    this.state = "running";
  }

  drawTokens(revealed, total) {
    if (!this.grid || this.grid.total !== total) {
      // The token grid has the image's aspect: 32x32-pixel patches, or as near as the count allows.
      let cols = Math.round(this.width / 32);
      let rows = Math.round(this.height / 32);
      if (cols * rows !== total) {
        cols = Math.max(1, Math.round(Math.sqrt((total * this.width) / this.height)));
        rows = Math.ceil(total / cols);
      }
      this.grid = { total, cols, rows, order: shuffled(total) };
      this.tokens.width = cols * 8;
      this.tokens.height = rows * 8;
    }
    const { cols, order } = this.grid;
    const ctx = this.tokens.getContext("2d");
    ctx.clearRect(0, 0, this.tokens.width, this.tokens.height);
    ctx.fillStyle = "rgba(18, 20, 28, 0.82)";
    for (let k = revealed; k < total; k++) {
      const cell = order[k];
      ctx.fillRect((cell % cols) * 8, Math.floor(cell / cols) * 8, 8, 8);
    }
  }

  done(body, roundTrip, alt) {
    const image = body.images[0];
    this.result.src = `data:image/${body.output_format};base64,${image.b64_json}`;
    this.result.alt = alt;
    this.bar.value = this.bar.max;
    this.caption.textContent = `${body.size} · seed ${image.seed} · ${body.model}`;
    const rows = STAGES.filter(([key]) => key in image.timings).map(([key, name]) => [name, image.timings[key]]);
    if (body.timings && "total" in body.timings) rows.push(["server total", body.timings.total]);
    rows.push(["round trip", roundTrip]);
    this.timings.replaceChildren(...rows.map(([name, value]) => {
      const item = document.createElement("div");
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = name;
      dd.textContent = seconds(value);
      item.append(dt, dd);
      return item;
    }));
    this.state = "done";
  }

  // The request ended without an image: `stopped` when the user pressed Stop (no message is shown then).
  failed(stopped = false) {
    // Refused by the page itself before start(): nothing on screen belongs to that request, so the
    // previous image stays as it is.
    if (!["waiting", "running"].includes(this.root.dataset.state)) return;
    if (this.kept) { // refused before any step: show the previous image again
      this.caption.textContent = this.kept.caption;
      this.frame.style.aspectRatio = this.kept.aspect;
      this.bar.value = this.bar.max;
      this.kept = null;
      this.state = "done";
      return;
    }
    this.caption.textContent = stopped ? "Stopped: no image." : "No image (see the message above).";
    this.state = this.events ? "failed" : "empty";
  }
}
