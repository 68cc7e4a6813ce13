// COCO run-length masks (pycocotools' compressed "counts" string) decoded in the browser.
"use strict";

// The string packs each run length in 5-bit groups (offset by 48 to stay printable ASCII);
// bit 0x20 says another group follows, bit 0x10 of the last group is the sign. From the third
// run on, the value is stored as a difference to the run two places before.
function rleCounts(s) {
  const counts = [];
  let p = 0;
  while (p < s.length) {
    let x = 0, k = 0, more = true;
    while (more) {
      const c = s.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = (c & 0x20) !== 0;
      p += 1; k += 1;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

// -> Uint8Array of h*w in row-major order (1 = inside). Runs alternate 0,1,0,... and walk the
// image column by column (Fortran order), as pycocotools writes them.
function rleDecode(rle) {
  const h = rle.size[0], w = rle.size[1];
  const out = new Uint8Array(h * w);
  const counts = typeof rle.counts === "string" ? rleCounts(rle.counts) : rle.counts;
  let idx = 0;
  for (let r = 0; r < counts.length; r++) {
    const n = counts[r];
    if (r % 2 === 1) {
      for (let j = idx; j < idx + n; j++) {
        const x = (j / h) | 0, y = j - x * h;
        out[y * w + x] = 1;
      }
    }
    idx += n;
  }
  return out;
}
