// The approver page of `countersign dev` (development only): it stands in
// for the person's phone. It polls /api/requests every second and updates
// cards in place, so a countdown or a half-pressed button is never reset.
// Everything an agent influenced is inserted with textContent, never as HTML.
'use strict';

const REFRESH_MS = 1000;
const params = new URLSearchParams(location.search);
let user = params.get('user') || '';
const cards = new Map(); // id -> { el, deadline, state }
let refreshing = false;

const $ = (id) => document.getElementById(id);

function humanize(key) {
  const words = String(key)
    .replace(/^urn:[^]*:/, '')
    .replace(/([a-z])([A-Z])/g, '$1 $2')
    .replace(/[_-]+/g, ' ')
    .trim();
  return words ? words.charAt(0).toUpperCase() + words.slice(1) : String(key);
}

function show(value) {
  if (value === null || value === undefined) return '—';
  if (typeof value === 'object') {
    if (Array.isArray(value) && value.every((v) => typeof v !== 'object')) return value.join(', ');
    return JSON.stringify(value);
  }
  return String(value);
}

function renderDetails(container, details) {
  container.replaceChildren();
  if (!Array.isArray(details)) return;
  for (const detail of details) {
    if (!detail || typeof detail !== 'object') continue;
    if (detail.type === 'countersign_call') {
      container.append(renderBinding(detail));
      continue;
    }
    const box = document.createElement('section');
    box.className = 'detail';
    const title = document.createElement('h2');
    title.textContent = humanize(detail.type || 'Details');
    const list = document.createElement('dl');
    for (const [key, value] of Object.entries(detail)) {
      if (key === 'type') continue;
      const dt = document.createElement('dt');
      dt.textContent = humanize(key);
      const dd = document.createElement('dd');
      dd.textContent = show(value);
      dd.dataset.key = key;
      list.append(dt, dd);
    }
    box.append(title, list);
    container.append(box);
  }
}

// The call binding (docs/call-binding.md): the one request the token will
// be good for, shown as the request line, not as fields.
function renderBinding(binding) {
  const box = document.createElement('section');
  box.className = 'detail binding';
  const title = document.createElement('h2');
  title.textContent = 'Only this exact request';
  const list = document.createElement('dl');
  const rows = [
    ['request', 'Request', `${binding.method} ${binding.target}`],
    ['host', 'Host', binding.host],
    ['tool', 'Tool', binding.tool],
    ['body_sha256', 'Body SHA-256', binding.body_sha256 && `${binding.body_sha256.slice(0, 12)}\u2026`],
  ];
  for (const [key, label, value] of rows) {
    if (value === undefined) continue;
    const dt = document.createElement('dt');
    dt.textContent = label;
    const dd = document.createElement('dd');
    dd.textContent = show(value);
    dd.dataset.key = key;
    list.append(dt, dd);
  }
  box.append(title, list);
  return box;
}

const OUTCOMES = {
  approved: 'Approved. The agent\u2019s call goes ahead.',
  // Four eyes: this answer is one of several the call needs.
  approvedOfSeveral: 'Approved. The agent\u2019s call goes ahead once the others asked have approved too.',
  denied: 'Denied. The agent was told you refused.',
  expired: 'Expired. Nobody answered in time, so the call was not made.',
};

function setState(card, state) {
  if (card.state === state) return;
  card.state = state;
  const el = card.el;
  el.classList.remove('pending', 'approved', 'denied', 'expired');
  el.classList.add(state);
  el.dataset.state = state;
  el.querySelector('.state').textContent = state === 'pending' ? 'Waiting for you' : state;
  const outcome = el.querySelector('.outcome');
  outcome.hidden = state === 'pending';
  outcome.textContent = (state === 'approved' && card.others ? OUTCOMES.approvedOfSeveral : OUTCOMES[state]) || '';
  el.querySelector('.actions').hidden = state !== 'pending';
  for (const b of el.querySelectorAll('button')) b.disabled = state !== 'pending';
  tick();
}

async function decide(card, id, action) {
  for (const b of card.el.querySelectorAll('button')) b.disabled = true;
  try {
    const response = await fetch(`/api/requests/${encodeURIComponent(id)}/${action}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: '{}',
    });
    const body = await response.json().catch(() => ({}));
    if (response.ok) {
      setState(card, body.state);
    } else if (body.state === 'expired') {
      setState(card, 'expired');
    } else {
      problem(`Could not ${action}: ${body.error || response.status}`);
      for (const b of card.el.querySelectorAll('button')) b.disabled = false;
    }
  } catch {
    problem('The development authorization server cannot be reached. Is countersign dev still running?');
    for (const b of card.el.querySelectorAll('button')) b.disabled = false;
  }
  refresh();
}

// Four eyes: who else was asked to approve this very call (the same call
// binding), and where their answer stands.
function setOthers(card, others) {
  const el = card.el;
  const list = Array.isArray(others) ? others : [];
  const text = list.map((o) => `${o.subject} (${o.state === 'pending' ? 'waiting' : o.state})`).join(', ');
  const several = list.length > 0;
  if (several !== card.others) {
    card.others = several;
    el.dataset.fourEyes = String(several);
    el.querySelector('.four-eyes').hidden = !several;
    el.querySelector('.others-label').hidden = !several;
    el.querySelector('.others').hidden = !several;
    if (card.state === 'approved') {
      el.querySelector('.outcome').textContent = several ? OUTCOMES.approvedOfSeveral : OUTCOMES.approved;
    }
  }
  el.querySelector('.others').textContent = text;
}

function createCard(request) {
  const el = $('card').content.firstElementChild.cloneNode(true);
  el.dataset.id = request.id;
  el.querySelector('.message').textContent = request.binding_message;
  renderDetails(el.querySelector('.details'), request.authorization_details);
  const scopes = el.querySelector('.scopes');
  for (const scope of request.scopes || []) {
    const chip = document.createElement('span');
    chip.className = 'scope';
    chip.textContent = scope;
    scopes.append(chip);
  }
  el.querySelector('.audience').textContent = request.audience || 'sign-in only';
  el.querySelector('.client').textContent = request.client_id;
  const card = { el, deadline: 0, state: null, others: false };
  setOthers(card, request.also_asked);
  el.querySelector('.approve').addEventListener('click', () => decide(card, request.id, 'approve'));
  el.querySelector('.deny').addEventListener('click', () => decide(card, request.id, 'deny'));
  return card;
}

function problem(text) {
  const p = $('problem');
  p.textContent = text || '';
  p.hidden = !text;
}

function renderUsers(users) {
  const nav = $('users');
  if (nav.childElementCount === users.length) {
    for (const a of nav.children) {
      if (a.dataset.user === user) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
    return;
  }
  nav.replaceChildren();
  for (const name of users) {
    const a = document.createElement('a');
    a.href = `/approve?user=${encodeURIComponent(name)}`;
    a.textContent = name;
    a.dataset.user = name;
    if (name === user) a.setAttribute('aria-current', 'page');
    nav.append(a);
  }
}

async function refresh() {
  if (refreshing) return;
  refreshing = true;
  try {
    const response = await fetch(`/api/requests?user=${encodeURIComponent(user)}`, { cache: 'no-store' });
    const body = await response.json();
    if (!response.ok) {
      renderUsers(body.users || []);
      problem(`Unknown user \u201c${user}\u201d. Pick one above.`);
      return;
    }
    problem('');
    user = body.user;
    renderUsers(body.users);
    $('empty-user').textContent = user;
    const seen = new Set();
    const list = $('requests');
    for (const request of body.requests) {
      seen.add(request.id);
      let card = cards.get(request.id);
      if (!card) {
        card = createCard(request);
        cards.set(request.id, card);
        list.prepend(card.el);
      }
      card.deadline = Date.now() + request.expires_in_ms;
      setOthers(card, request.also_asked);
      setState(card, request.state);
    }
    for (const [id, card] of cards) {
      if (!seen.has(id)) {
        card.el.remove();
        cards.delete(id);
      }
    }
    const pending = body.requests.filter((r) => r.state === 'pending').length;
    $('empty').hidden = pending > 0;
    document.title = `${pending ? `(${pending}) ` : ''}Approvals \u00b7 countersign dev (development only)`;
  } catch {
    problem('The development authorization server cannot be reached. Is countersign dev still running?');
  } finally {
    refreshing = false;
  }
}

function tick() {
  const now = Date.now();
  for (const card of cards.values()) {
    const el = card.el.querySelector('.countdown');
    if (card.state !== 'pending') {
      el.textContent = '';
      continue;
    }
    const left = Math.max(0, Math.ceil((card.deadline - now) / 1000));
    if (left === 0) {
      setState(card, 'expired');
      continue;
    }
    const m = Math.floor(left / 60);
    const s = String(left % 60).padStart(2, '0');
    el.textContent = `Expires in ${m}:${s}`;
    el.classList.toggle('soon', left <= 15);
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
setInterval(tick, 250);
