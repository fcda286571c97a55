// The kiosk page: camera frames to the edge node a few times a second, its verdicts shown
// large, the status line, and the staff's paper log. Everything is served by the edge node;
// nothing here reaches the internet. Decisions are the device's: this script only shows them.
'use strict';

(() => {
  const FRAME_EVERY_MS = 250; // up to four frames a second, one request in flight
  const FRAME_WIDTH = 640; // frames are scaled down to this width before sending
  const FULL_LADDER_EVERY_MS = 1000; // one frame a second gets the device's whole decoding ladder
  const HOLD_MS = 2500; // a verdict stays on screen at least this long
  const SAME_CODE_MS = 20000; // the accepted code still in view keeps the green screen
  const STATUS_EVERY_MS = 5000;
  const CLOCK_DIFF_WARN_S = 120; // device and tablet clocks differing by more: warn
  const STAFF_IDLE_MS = 5 * 60 * 1000;
  const IDLE = {
    verdict: 'no_code',
    kind: 'idle',
    message_ko: 'QR 코드를 카메라에 보여 주세요',
    message_en: 'Show your check-in QR code to the camera',
    code: null,
  };

  const $ = (id) => document.getElementById(id);
  const video = $('preview');
  const canvas = document.createElement('canvas');

  // Visible to tests and to anyone debugging a kiosk from the browser's console.
  const state = {
    facing: 'environment',
    stream: null,
    paused: false,
    shown: { verdict: 'no_code', code: null, at: 0 },
    lastAccepted: null,
    audio: null,
    framesSent: 0,
    verdictsShown: 0,
    lastStatus: null,
    lastFull: -Infinity,
  };
  window.kiosk = state;

  function setProblem(text) {
    $('problem').textContent = text || '';
  }

  // ---- camera ----

  function cameraMessage(text) {
    const m = $('camera-message');
    m.textContent = text || '';
    m.hidden = !text;
  }

  async function startCamera(facing) {
    state.facing = facing;
    $('cam-back').classList.toggle('active', facing === 'environment');
    $('cam-front').classList.toggle('active', facing === 'user');
    if (state.stream) {
      state.stream.getTracks().forEach((t) => t.stop());
      state.stream = null;
    }
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      cameraMessage(
        '이 주소에서는 브라우저가 카메라를 허용하지 않습니다. "사진으로 확인"을 쓰거나 직원에게 알려 주세요. · ' +
          'The browser allows no camera on this address (not a secure context): use "Take a photo", or see the README.'
      );
      return;
    }
    try {
      state.stream = await navigator.mediaDevices.getUserMedia({
        audio: false,
        video: { facingMode: { ideal: facing }, width: { ideal: 1280 }, height: { ideal: 720 } },
      });
    } catch (e) {
      cameraMessage('카메라를 열 수 없습니다 · Cannot open the camera (' + e.name + '). "사진으로 확인 · Take a photo" still works.');
      return;
    }
    cameraMessage('');
    video.srcObject = state.stream;
    video.classList.toggle('mirror', facing === 'user');
    try {
      await video.play();
    } catch (e) {
      // Autoplay of a muted stream is allowed everywhere; a refusal only delays the preview.
    }
  }

  function toJpeg(source, width, height) {
    const scale = Math.min(1, FRAME_WIDTH / width);
    canvas.width = Math.max(1, Math.round(width * scale));
    canvas.height = Math.max(1, Math.round(height * scale));
    canvas.getContext('2d').drawImage(source, 0, 0, canvas.width, canvas.height);
    return new Promise((resolve) => canvas.toBlob(resolve, 'image/jpeg', 0.85));
  }

  async function sendFrame(blob, full) {
    let resp;
    try {
      resp = await fetch(full ? '/kiosk/frame?ladder=full' : '/kiosk/frame', {
        method: 'POST',
        headers: { 'Content-Type': 'image/jpeg' },
        body: blob,
        cache: 'no-store',
      });
    } catch (e) {
      setProblem('기기에 연결할 수 없습니다 · Cannot reach the device');
      return;
    }
    state.framesSent += 1;
    let body = null;
    try {
      body = await resp.json();
    } catch (e) {
      body = null;
    }
    if (!resp.ok || !body) {
      setProblem((body && body.error) || 'frame refused (' + resp.status + ')');
      return;
    }
    setProblem('');
    onVerdict(body);
  }

  async function frameLoop() {
    const started = performance.now();
    try {
      if (!state.paused && video.readyState >= 2 && video.videoWidth > 0) {
        const blob = await toJpeg(video, video.videoWidth, video.videoHeight);
        if (blob) {
          // One pass on most frames, the whole ladder once a second: a damaged code is still
          // read within a second, and frames with nobody in view stay cheap.
          const full = started - state.lastFull >= FULL_LADDER_EVERY_MS;
          if (full) {
            state.lastFull = started;
          }
          await sendFrame(blob, full);
        }
      }
    } finally {
      const wait = Math.max(0, FRAME_EVERY_MS - (performance.now() - started));
      setTimeout(frameLoop, wait);
    }
  }

  async function onPhoto(file) {
    if (!file) {
      return;
    }
    try {
      const bitmap = await createImageBitmap(file);
      const blob = await toJpeg(bitmap, bitmap.width, bitmap.height);
      if (blob) {
        await sendFrame(blob, true);
      }
    } catch (e) {
      setProblem('사진을 읽을 수 없습니다 · Cannot read the photo');
    }
  }

  // ---- verdicts ----

  function show(v) {
    document.body.dataset.verdict = v.kind;
    $('verdict-ko').textContent = v.message_ko;
    $('verdict-en').textContent = v.message_en;
    state.shown = { verdict: v.verdict, code: v.code, at: performance.now() };
    if (v.kind !== 'idle') {
      state.verdictsShown += 1;
    }
  }

  function onVerdict(v) {
    const now = performance.now();
    if (v.verdict === 'no_code') {
      if (state.shown.verdict !== 'no_code' && now - state.shown.at > HOLD_MS) {
        show(IDLE);
      }
      return;
    }
    // The device stores one visit per code however many frames show it; the frames after
    // the first say "duplicate". While the code that was just accepted stays in view, the
    // visitor keeps seeing green: it is the same showing, not a second one.
    const la = state.lastAccepted;
    if (v.verdict === 'duplicate' && la && v.code === la.code && now - la.at < SAME_CODE_MS) {
      la.at = now;
      state.shown.at = now;
      return;
    }
    if (v.verdict === state.shown.verdict && v.code === state.shown.code) {
      state.shown.at = now;
      return;
    }
    show(v);
    if (v.verdict === 'accepted') {
      state.lastAccepted = { code: v.code, at: now };
      announceAccepted();
      refreshStatus();
    } else {
      tone([440, 330], 0.15);
      document.body.dataset.feedback = 'refusal-tone';
    }
  }

  // ---- sound ----

  function audio() {
    if (!state.audio) {
      const AC = window.AudioContext || window.webkitAudioContext;
      if (!AC) {
        return null;
      }
      state.audio = new AC();
    }
    if (state.audio.state === 'suspended') {
      state.audio.resume().catch(() => {});
    }
    $('sound-hint').hidden = state.audio.state === 'running';
    return state.audio;
  }

  function tone(freqs, seconds) {
    const ctx = audio();
    if (!ctx) {
      return;
    }
    let t = ctx.currentTime;
    for (const f of freqs) {
      const osc = ctx.createOscillator();
      const gain = ctx.createGain();
      osc.type = 'sine';
      osc.frequency.value = f;
      gain.gain.setValueAtTime(0.0001, t);
      gain.gain.exponentialRampToValueAtTime(0.4, t + 0.01);
      gain.gain.exponentialRampToValueAtTime(0.0001, t + seconds);
      osc.connect(gain).connect(ctx.destination);
      osc.start(t);
      osc.stop(t + seconds + 0.02);
      t += seconds + 0.03;
    }
  }

  function koreanVoice() {
    if (!('speechSynthesis' in window)) {
      return null;
    }
    return speechSynthesis.getVoices().find((v) => /^ko([-_]|$)/i.test(v.lang)) || null;
  }

  function announceAccepted() {
    const voice = koreanVoice();
    if (voice) {
      const u = new SpeechSynthesisUtterance('인증되었습니다');
      u.lang = 'ko-KR';
      u.voice = voice;
      speechSynthesis.cancel();
      speechSynthesis.speak(u);
      document.body.dataset.feedback = 'speech';
    } else {
      tone([880, 1320], 0.12);
      document.body.dataset.feedback = 'tone';
    }
  }

  // ---- status line ----

  function hhmm(unix) {
    const d = new Date(unix * 1000);
    return String(d.getHours()).padStart(2, '0') + ':' + String(d.getMinutes()).padStart(2, '0');
  }

  function ago(seconds) {
    if (seconds < 90) {
      return Math.max(0, Math.round(seconds)) + ' s ago';
    }
    if (seconds < 5400) {
      return Math.round(seconds / 60) + ' min ago';
    }
    if (seconds < 172800) {
      return Math.round(seconds / 3600) + ' h ago';
    }
    return Math.round(seconds / 86400) + ' days ago';
  }

  function renderStatus(s) {
    state.lastStatus = s;
    $('facility').textContent = s.facility_name + ' · ' + s.device_name;
    const net = $('net');
    net.className = s.online ? 'online' : 'offline';
    net.textContent = s.online ? '온라인 · Online' : '오프라인 · Offline';
    $('unsynced').textContent = '미전송 ' + s.unsynced + ' · Unsynced ' + s.unsynced;
    $('last-sync').textContent =
      s.last_sync == null
        ? '동기화 기록 없음 · Never synced'
        : '마지막 동기화 ' + hhmm(s.last_sync) + ' · Last sync ' + ago(s.now - s.last_sync);
    $('day-keys').textContent = '일일 키 ' + s.day_keys_left + '일 · Day keys ' + s.day_keys_left;
    const tabletNow = Date.now() / 1000;
    const diff = Math.round(s.now - tabletNow);
    const cw = $('clock-warning');
    if (s.clock_warning) {
      cw.textContent = '⚠ 기기 시계를 확인하세요 · Check the device clock (hub differs by ' + s.clock_offset + ' s)';
      cw.hidden = false;
    } else if (Math.abs(diff) > CLOCK_DIFF_WARN_S) {
      cw.textContent = '⚠ 시계 확인 필요 · Clock looks wrong: device and tablet differ by ' + diff + ' s';
      cw.hidden = false;
    } else {
      cw.textContent = '';
      cw.hidden = true;
    }
    $('warnings').textContent = (s.warnings || []).filter((w) => !/clock/i.test(w) || !s.clock_warning).join(' · ');
  }

  async function refreshStatus() {
    try {
      const resp = await fetch('/kiosk/status', { cache: 'no-store' });
      if (resp.ok) {
        renderStatus(await resp.json());
      }
    } catch (e) {
      const net = $('net');
      net.className = 'offline';
      net.textContent = '기기 응답 없음 · Device not answering';
    }
  }

  async function statusLoop() {
    await refreshStatus();
    setTimeout(statusLoop, STATUS_EVERY_MS);
  }

  // ---- staff mode ----

  let staffTimer = null;

  function staffActivity() {
    clearTimeout(staffTimer);
    staffTimer = setTimeout(closeStaff, STAFF_IDLE_MS);
  }

  function staffView(which) {
    $('pin-form').hidden = which !== 'pin';
    $('paper-form').hidden = which !== 'paper';
    $('paper-saved').hidden = which !== 'saved';
  }

  function clearPaper() {
    $('paper-form').reset();
    $('guardian-row').hidden = true;
    $('paper-error').textContent = '';
  }

  function openStaff() {
    state.paused = true;
    $('pin').value = '';
    $('pin-error').textContent =
      state.lastStatus && state.lastStatus.staff_pin_set === false
        ? '이 기기에는 직원 PIN이 없습니다 · No staff PIN is set: run `edge-node pin set` on the device'
        : '';
    staffView('pin');
    $('staff').hidden = false;
    $('pin').focus();
    staffActivity();
  }

  function closeStaff() {
    clearTimeout(staffTimer);
    clearPaper();
    $('pin').value = '';
    $('staff').hidden = true;
    state.paused = false;
    fetch('/kiosk/staff/logout', { method: 'POST' }).catch(() => {});
  }

  async function postJson(url, body) {
    const resp = await fetch(url, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify(body),
      cache: 'no-store',
    });
    let data = {};
    try {
      data = await resp.json();
    } catch (e) {
      data = {};
    }
    return { ok: resp.ok, status: resp.status, data };
  }

  async function login(ev) {
    ev.preventDefault();
    staffActivity();
    const pin = $('pin').value;
    $('pin').value = '';
    let r;
    try {
      r = await postJson('/kiosk/staff/login', { pin });
    } catch (e) {
      $('pin-error').textContent = '기기에 연결할 수 없습니다 · Cannot reach the device';
      return;
    }
    if (r.ok) {
      $('pin-error').textContent = '';
      clearPaper();
      staffView('paper');
      $('paper-name').focus();
    } else {
      $('pin-error').textContent = r.data.error || 'refused (' + r.status + ')';
    }
  }

  async function savePaper(ev) {
    ev.preventDefault();
    staffActivity();
    const entry = {
      name: $('paper-name').value,
      phone: $('paper-phone').value,
      safe_number: $('paper-safe-number').value,
      consent_collect: $('consent-collect').checked,
      consent_share: $('consent-share').checked,
      minor: $('minor').checked,
      guardian_consent: $('guardian-consent').checked,
      remarks: $('paper-remarks').value,
    };
    let r;
    try {
      r = await postJson('/kiosk/paper', entry);
    } catch (e) {
      $('paper-error').textContent = '기기에 연결할 수 없습니다 · Cannot reach the device; nothing was recorded';
      return;
    }
    if (r.ok) {
      // The entry leaves the screen at once: the next visitor must not see it.
      clearPaper();
      staffView('saved');
      refreshStatus();
    } else if (r.status === 401) {
      clearPaper();
      staffView('pin');
      $('pin-error').textContent = r.data.error || 'staff mode has ended';
    } else {
      $('paper-error').textContent = '저장되지 않았습니다 · Not saved: ' + (r.data.error || r.status);
    }
  }

  // ---- wiring ----

  function init() {
    $('cam-back').addEventListener('click', () => startCamera('environment'));
    $('cam-front').addEventListener('click', () => startCamera('user'));
    $('photo').addEventListener('change', (ev) => {
      onPhoto(ev.target.files && ev.target.files[0]);
      ev.target.value = '';
    });
    $('staff-open').addEventListener('click', openStaff);
    document.querySelectorAll('.staff-close').forEach((b) => b.addEventListener('click', closeStaff));
    $('pin-form').addEventListener('submit', login);
    $('paper-form').addEventListener('submit', savePaper);
    $('paper-form').addEventListener('input', staffActivity);
    $('minor').addEventListener('change', () => {
      $('guardian-row').hidden = !$('minor').checked;
      if (!$('minor').checked) {
        $('guardian-consent').checked = false;
      }
    });
    $('paper-next').addEventListener('click', () => {
      clearPaper();
      staffView('paper');
      $('paper-name').focus();
      staffActivity();
    });
    // Browsers start sound only after a touch; the first one anywhere turns it on.
    document.addEventListener('pointerdown', () => audio(), { passive: true });
    if ('speechSynthesis' in window) {
      speechSynthesis.getVoices(); // voices load asynchronously; ask early
    }
    audio();
    show(IDLE);
    startCamera(state.facing);
    frameLoop();
    statusLoop();
  }

  init();
})();
