// The edit mask: a canvas at the image's own resolution laid over it. Brush strokes paint what to
// regenerate; the eraser takes paint away. `toBlob` exports what /v1/edit expects: white = regenerate,
// black = keep, the image's size (any painted pixel, however faint, counts as painted).

const PAINT = [255, 48, 96]; // shown through the canvas's CSS opacity

export class MaskPainter {
  constructor(imageCanvas, maskCanvas) {
    this.image = imageCanvas;
    this.mask = maskCanvas;
    this.ctx = maskCanvas.getContext("2d", { willReadFrequently: true }); // invert and export read pixels
    this.brush = 32; // diameter in image pixels
    this.erase = false;
    this.last = null; // previous pointer position while drawing
    this.loaded = false;
    this.onchange = () => {};
    maskCanvas.addEventListener("pointerdown", (e) => this.down(e));
    maskCanvas.addEventListener("pointermove", (e) => this.move(e));
    for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) {
      maskCanvas.addEventListener(type, () => this.up());
    }
  }

  get width() { return this.image.width; }
  get height() { return this.image.height; }

  // Show `source` (an ImageBitmap or canvas of the edit input) and start with an empty mask.
  load(source) {
    for (const canvas of [this.image, this.mask]) {
      canvas.width = source.width;
      canvas.height = source.height;
    }
    this.image.getContext("2d").drawImage(source, 0, 0);
    this.loaded = true;
    this.clear();
  }

  point(e) {
    const r = this.mask.getBoundingClientRect();
    return [(e.clientX - r.left) * (this.mask.width / r.width), (e.clientY - r.top) * (this.mask.height / r.height)];
  }

  down(e) {
    if (e.button !== 0 || !this.loaded) return;
    e.preventDefault();
    this.mask.setPointerCapture(e.pointerId); // strokes continue past the edge of the canvas
    this.last = this.point(e);
    this.stroke(this.last, this.last);
  }

  move(e) {
    if (!this.last) return;
    const p = this.point(e);
    this.stroke(this.last, p);
    this.last = p;
  }

  up() {
    if (!this.last) return;
    this.last = null;
    this.onchange(); // once per stroke: listeners may read the whole mask
  }

  stroke(from, to) {
    const ctx = this.ctx;
    ctx.globalCompositeOperation = this.erase ? "destination-out" : "source-over";
    ctx.strokeStyle = `rgb(${PAINT.join(",")})`;
    ctx.lineWidth = this.brush;
    ctx.lineCap = "round";
    ctx.beginPath();
    ctx.moveTo(from[0], from[1]);
    ctx.lineTo(to[0] + 0.01, to[1]); // a zero-length line draws nothing; this makes a dot
    ctx.stroke();
  }

  clear() {
    this.ctx.clearRect(0, 0, this.mask.width, this.mask.height);
    this.onchange();
  }

  invert() {
    const ctx = this.ctx;
    const data = ctx.getImageData(0, 0, this.mask.width, this.mask.height);
    const px = data.data;
    for (let i = 0; i < px.length; i += 4) {
      const painted = px[i + 3] > 0;
      [px[i], px[i + 1], px[i + 2]] = PAINT;
      px[i + 3] = painted ? 0 : 255;
    }
    ctx.putImageData(data, 0, 0);
    this.onchange();
  }

  // Fraction of the image marked for regeneration (0 when nothing is painted).
  coverage() {
    if (!this.loaded) return 0;
    const px = this.ctx.getImageData(0, 0, this.mask.width, this.mask.height).data;
    let marked = 0;
    for (let i = 3; i < px.length; i += 4) if (px[i] > 0) marked++;
    return marked / (px.length / 4);
  }

  toBlob() {
    const { width, height } = this.mask;
    const src = this.ctx.getImageData(0, 0, width, height).data;
    const out = new ImageData(width, height);
    for (let i = 0; i < src.length; i += 4) {
      const v = src[i + 3] > 0 ? 255 : 0;
      out.data[i] = out.data[i + 1] = out.data[i + 2] = v;
      out.data[i + 3] = 255;
    }
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    canvas.getContext("2d").putImageData(out, 0, 0);
    return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  }
}
