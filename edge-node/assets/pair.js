// The tablet's side of pairing (edge-node/src/pairing.rs): download the device's certificate
// authority once, hash it, and offer it to install only if it matches the fingerprint the
// QR code carried after "#sha256=" (a fragment: never sent over the network).
"use strict";

// SHA-256 for a page that is not yet a secure context (crypto.subtle is missing there).
function sha256Fallback(bytes) {
  const K = new Uint32Array([
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2]);
  const H = new Uint32Array([0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
    0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]);
  const len = bytes.length;
  const padded = new Uint8Array(((len + 9 + 63) >> 6) << 6);
  padded.set(bytes);
  padded[len] = 0x80;
  const view = new DataView(padded.buffer);
  view.setUint32(padded.length - 8, Math.floor(len / 0x20000000));
  view.setUint32(padded.length - 4, (len << 3) >>> 0);
  const W = new Uint32Array(64);
  const rotr = (x, n) => (x >>> n) | (x << (32 - n));
  for (let off = 0; off < padded.length; off += 64) {
    for (let i = 0; i < 16; i++) W[i] = view.getUint32(off + 4 * i);
    for (let i = 16; i < 64; i++) {
      const s0 = rotr(W[i - 15], 7) ^ rotr(W[i - 15], 18) ^ (W[i - 15] >>> 3);
      const s1 = rotr(W[i - 2], 17) ^ rotr(W[i - 2], 19) ^ (W[i - 2] >>> 10);
      W[i] = (W[i - 16] + s0 + W[i - 7] + s1) >>> 0;
    }
    let [a, b, c, d, e, f, g, h] = H;
    for (let i = 0; i < 64; i++) {
      const t1 = (h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + W[i]) >>> 0;
      const t2 = ((rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))) >>> 0;
      h = g; g = f; f = e; e = (d + t1) >>> 0; d = c; c = b; b = a; a = (t1 + t2) >>> 0;
    }
    H[0] += a; H[1] += b; H[2] += c; H[3] += d; H[4] += e; H[5] += f; H[6] += g; H[7] += h;
  }
  const out = new Uint8Array(32);
  const ov = new DataView(out.buffer);
  for (let i = 0; i < 8; i++) ov.setUint32(4 * i, H[i]);
  return out;
}

async function sha256Hex(bytes) {
  let digest;
  if (window.crypto && window.crypto.subtle) {
    digest = new Uint8Array(await window.crypto.subtle.digest("SHA-256", bytes));
  } else {
    digest = sha256Fallback(bytes);
  }
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

function colons(hex) {
  return (hex.toUpperCase().match(/../g) || []).join(":");
}

function show(state, message) {
  document.body.dataset.pairing = state;
  document.getElementById("pair-status").textContent = message;
}

async function pair() {
  const m = /^#sha256=([0-9a-fA-F]{64})$/.exec(window.location.hash);
  if (!m) {
    show("nofingerprint", "This address carries no fingerprint: scan the QR code on the device's pairing sheet. Nothing was installed.");
    return;
  }
  const expected = m[1].toLowerCase();
  document.getElementById("pair-expected").textContent = colons(expected);
  let resp;
  try {
    resp = await fetch(window.location.pathname.replace(/\/$/, "") + "/ca.crt", { cache: "no-store" });
  } catch (e) {
    show("used", "The device did not answer. Check the tablet is on the facility's network.");
    return;
  }
  if (!resp.ok) {
    show("used", "This pairing code is used up or has expired. Open the pairing sheet on the device again.");
    return;
  }
  const bytes = new Uint8Array(await resp.arrayBuffer());
  const got = await sha256Hex(bytes);
  document.getElementById("pair-got").textContent = colons(got);
  if (got !== expected) {
    show("mismatch", "The certificate does NOT match the device's fingerprint. Do not install anything: this may not be your device. 인증서가 일치하지 않습니다. 설치하지 마십시오.");
    return;
  }
  const url = URL.createObjectURL(new Blob([bytes], { type: "application/x-x509-ca-cert" }));
  document.getElementById("pair-download").href = url;
  document.getElementById("pair-install").hidden = false;
  show("match", "The certificate matches the device's fingerprint. Save and install it. 인증서가 일치합니다.");
}

window.kioskPairing = { sha256Fallback, sha256Hex };
pair();
