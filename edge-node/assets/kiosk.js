// The kiosk page: camera frames to the edge node a few times a second, its verdicts shown
// large, the status line, and the staff's paper log. Everything is served by the edge node;
// nothing here reaches the internet. Decisions are the device's: this script only shows them.
// Every visitor: verdicts are shown and spoken in the language chosen on screen (Korean,
// English, Chinese; remembered by the tablet), announced once through a live region for
// screen readers, and the page has a large-text and a high-contrast mode.
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
  const LANGS = ['ko', 'en', 'zh'];
  // BCP 47 tags: for `lang` attributes, and to pick a voice.
  const LANG_TAG = { ko: 'ko-KR', en: 'en-US', zh: 'zh-CN' };
  const STORE = { lang: 'kiosk-lang', large: 'kiosk-large-text', contrast: 'kiosk-high-contrast' };
  // What the visitor is told, by the message code the device answers (`message`); the
  // device's Korean and English texts are the same (edge-node's kiosk tests check it).
  const MESSAGES = {
    'idle': {
      ko: "QR 코드를 카메라에 보여 주세요",
      en: "Show your check-in QR code to the camera",
      zh: "请将签到二维码对准摄像头",
    },
    'accepted': {
      ko: "인증되었습니다",
      en: "Verified",
      zh: "验证成功",
    },
    'duplicate': {
      ko: "이미 체크인되었습니다",
      en: "You are already checked in",
      zh: "您已签到",
    },
    'no_code': {
      ko: "QR 코드를 카메라 앞에 흔들리지 않게 대 주세요",
      en: "Hold the code steady in front of the camera",
      zh: "请将二维码稳定地放在摄像头前",
    },
    'malformed': {
      ko: "체크인 코드가 아니거나 손상된 코드입니다. 앱의 체크인 QR 코드를 새로고침해 다시 대 주세요",
      en: "This is not a check-in code, or the code is damaged. Refresh the check-in code in your app and show it again",
      zh: "这不是签到码，或二维码已损坏。请在应用中刷新签到二维码后重新出示",
    },
    'malformed.not_checkin_code': {
      ko: "체크인 코드가 아닙니다. 앱에서 QR 체크인 코드를 열어 보여 주세요",
      en: "This is not a check-in code. Open the QR check-in code in your app and show it",
      zh: "这不是签到码。请在应用中打开签到二维码并出示",
    },
    'malformed.unreadable': {
      ko: "코드를 제대로 읽지 못했습니다. 앱에서 코드를 새로고침해 다시 대 주세요",
      en: "The check-in code could not be read. Refresh the code in your app and show it again",
      zh: "未能读取签到码。请在应用中刷新二维码后重新出示",
    },
    'malformed.bad_ttl': {
      ko: "올바르지 않은 체크인 코드입니다. 앱에서 코드를 새로고침하거나 수기 명부를 작성해 주세요",
      en: "This check-in code is not valid. Refresh the code in your app, or use the paper log",
      zh: "该签到码无效。请在应用中刷新二维码，或填写纸质登记簿",
    },
    'unsupported_version': {
      ko: "이 코드 형식은 이곳에서 지원하지 않습니다. 다른 앱의 QR 코드를 사용하거나 수기 명부를 작성해 주세요",
      en: "This code format is not supported here. Use another check-in app or the paper log",
      zh: "此处不支持该二维码格式。请使用其他签到应用或填写纸质登记簿",
    },
    'unknown_key': {
      ko: "이 앱의 코드는 이곳에서 사용할 수 없습니다. 다른 앱의 QR 코드를 사용하거나 수기 명부를 작성해 주세요",
      en: "This app's code is not accepted here. Use another check-in app or the paper log",
      zh: "此处不接受该应用的二维码。请使用其他签到应用或填写纸质登记簿",
    },
    'key_not_valid': {
      ko: "이 앱의 코드는 이곳에서 사용할 수 없습니다. 다른 앱의 QR 코드를 사용하거나 수기 명부를 작성해 주세요",
      en: "This app's code is not accepted here. Use another check-in app or the paper log",
      zh: "此处不接受该应用的二维码。请使用其他签到应用或填写纸质登记簿",
    },
    'bad_signature': {
      ko: "유효하지 않은 코드입니다. 앱에서 코드를 새로고침해 다시 대 주세요",
      en: "Invalid code. Refresh the code in your app and show it again",
      zh: "二维码无效。请在应用中刷新二维码后重新出示",
    },
    'not_yet_valid': {
      ko: "코드의 시간이 이 기기와 맞지 않습니다. 앱에서 코드를 새로고침해 주세요. 계속되면 직원에게 알려 주세요",
      en: "The code's time does not match this device. Refresh the code in your app; if this repeats, tell the staff",
      zh: "二维码的时间与本设备不一致。请在应用中刷新二维码；如果反复出现，请告知工作人员",
    },
    'expired': {
      ko: "유효 시간이 지난 코드입니다. 앱에서 코드를 새로고침해 다시 대 주세요",
      en: "This code has expired. Refresh the code in your app and show it again",
      zh: "二维码已过期。请在应用中刷新二维码后重新出示",
    },
  };
  // A symbol beside the colour, for visitors who cannot tell the colours apart.
  const ICON = { accepted: '✓', duplicate: '✓', refresh: '↻', not_checkin: '✕', unknown_issuer: '✕' };
  const IDLE = { verdict: 'no_code', kind: 'idle', message: 'idle', code: null };

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
    lang: 'ko',
    // The last verdict announced to screen readers and spoken: { text, lang } (tests read it).
    announced: null,
    spoken: null,
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
    $('cam-back').setAttribute('aria-pressed', String(facing === 'environment'));
    $('cam-front').setAttribute('aria-pressed', String(facing === 'user'));
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

  // The verdict's text in `lang`: the page's own table, or the device's Korean and English
  // for a message code this page does not know (a newer device).
  function textOf(v, lang) {
    const m = MESSAGES[v.message];
    if (m) {
      return m[lang];
    }
    return lang === 'ko' ? v.message_ko : v.message_en || v.message_ko || '';
  }

  function show(v) {
    document.body.dataset.verdict = v.kind;
    for (const l of LANGS) {
      $('verdict-' + l).textContent = textOf(v, l);
    }
    $('verdict-icon').textContent = ICON[v.kind] || '';
    state.shown = { verdict: v.verdict, code: v.code, at: performance.now() };
    if (v.kind !== 'idle') {
      state.verdictsShown += 1;
      announce(textOf(v, state.lang));
    }
  }

  // Screen readers read the live region when its text changes: emptied first, so the same
  // verdict twice in a row is read twice.
  function announce(text) {
    const live = $('verdict-live');
    live.lang = LANG_TAG[state.lang];
    live.textContent = '';
    setTimeout(() => {
      live.textContent = text;
    }, 50);
    state.announced = { text, lang: live.lang };
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
      const spoken = speak(textOf(v, state.lang));
      if (!spoken) {
        tone([880, 1320], 0.12);
      }
      document.body.dataset.feedback = spoken ? 'speech' : 'tone';
      refreshStatus();
    } else {
      tone([440, 330], 0.15);
      // After the tone, so the two do not talk over each other.
      const spoken = speak(textOf(v, state.lang));
      document.body.dataset.feedback = spoken ? 'refusal-speech' : 'refusal-tone';
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

  // A voice of the browser's for `lang`, if it has one (many tablets have Korean and English;
  // headless browsers have none).
  function voiceFor(lang) {
    if (!('speechSynthesis' in window)) {
      return null;
    }
    const prefix = new RegExp('^' + lang + '([-_]|$)', 'i');
    const voices = speechSynthesis.getVoices() || [];
    if (lang === 'zh') {
      // Mandarin in mainland China first: simplified Chinese is what the page shows.
      const cn = voices.find((v) => /^(zh|cmn)[-_](CN|Hans)/i.test(v.lang));
      if (cn) {
        return cn;
      }
    }
    return voices.find((v) => prefix.test(v.lang)) || null;
  }

  // Speaks `text` in the visitor's language; false when the browser has no voice for it.
  function speak(text) {
    const voice = voiceFor(state.lang);
    if (!voice) {
      return false;
    }
    const u = new SpeechSynthesisUtterance(text);
    u.lang = LANG_TAG[state.lang];
    try {
      u.voice = voice;
    } catch (e) {
      // A voice the browser will not take: the language alone picks one.
    }
    speechSynthesis.cancel();
    speechSynthesis.speak(u);
    state.spoken = { text, lang: u.lang };
    return true;
  }

  // ---- language and display ----

  function stored(key) {
    try {
      return localStorage.getItem(key);
    } catch (e) {
      return null; // storage disabled: the choice lasts until the page reloads
    }
  }

  function store(key, value) {
    try {
      localStorage.setItem(key, value);
    } catch (e) {
      // as above
    }
  }

  function setLang(lang) {
    state.lang = LANGS.includes(lang) ? lang : 'ko';
    store(STORE.lang, state.lang);
    document.querySelectorAll('button.lang').forEach((b) => {
      b.setAttribute('aria-pressed', String(b.dataset.lang === state.lang));
    });
    for (const l of LANGS) {
      $('verdict-' + l).classList.toggle('primary', l === state.lang);
    }
    document.body.dataset.lang = state.lang;
  }

  function setMode(id, key, className, on) {
    document.documentElement.classList.toggle(className, on);
    $(id).setAttribute('aria-pressed', String(on));
    store(key, on ? '1' : '0');
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

  // Everything but the staff dialog.
  function setBackgroundInert(on) {
    document.querySelectorAll('#status-bar, #settings, main, footer').forEach((e) => {
      e.inert = on;
    });
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
    // Keyboard and screen reader stay in the dialog while it is open; Escape leaves it.
    setBackgroundInert(true);
    $('pin').focus();
    staffActivity();
  }

  function closeStaff() {
    clearTimeout(staffTimer);
    clearPaper();
    $('pin').value = '';
    const wasOpen = !$('staff').hidden;
    $('staff').hidden = true;
    setBackgroundInert(false);
    if (wasOpen) {
      $('staff-open').focus();
    }
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
    $('photo-button').addEventListener('click', () => $('photo').click());
    document.querySelectorAll('button.lang').forEach((b) =>
      // All three texts are on screen already: the choice moves one to the front and is
      // the one spoken and announced from now on.
      b.addEventListener('click', () => setLang(b.dataset.lang))
    );
    $('large-text').addEventListener('click', () =>
      setMode('large-text', STORE.large, 'large-text', $('large-text').getAttribute('aria-pressed') !== 'true')
    );
    $('high-contrast').addEventListener('click', () =>
      setMode('high-contrast', STORE.contrast, 'high-contrast', $('high-contrast').getAttribute('aria-pressed') !== 'true')
    );
    document.addEventListener('keydown', (ev) => {
      if (ev.key === 'Escape' && !$('staff').hidden) {
        ev.preventDefault();
        closeStaff();
      }
    });
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
    setLang(stored(STORE.lang));
    setMode('large-text', STORE.large, 'large-text', stored(STORE.large) === '1');
    setMode('high-contrast', STORE.contrast, 'high-contrast', stored(STORE.contrast) === '1');
    audio();
    show(IDLE);
    startCamera(state.facing);
    frameLoop();
    statusLoop();
  }

  init();
})();
