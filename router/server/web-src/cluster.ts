// The cluster picture: polls GET /api/v1/cluster and draws the partition map.
//
// It owns turning that JSON into a picture: one canvas cell per partition coloured by its
// owner (a stable colour per node id), a corner mark on under-replicated partitions (ISR
// shorter than the replica list), the map epoch, the cluster leader, a legend and one bar
// per node. It must never assume fields the server does not send: every field is read
// defensively, and a standalone node gets a one-node picture with a "standalone" label.

export interface ClusterJson {
  mode?: string;
  cluster?: string;
  node?: string;
  leader?: string | null;
  term?: number | null;
  epoch?: number;
  partitions?: number;
  etcd_connected?: boolean;
  is_leader?: boolean;
  nodes?: Array<{ id: string; url?: string; partitions?: number; state?: string; draining?: boolean; load?: LoadJson }>;
  owners?: string[];
  replicas?: string[][];
  isr?: string[][];
  leader_epochs?: number[];
  /** Not sent by the server today; drawn when present (`load/<id>` records by node id). */
  loads?: Record<string, LoadJson>;
  last_error?: string | null;
}

interface LoadJson {
  connections?: number;
  msg_rate?: number;
  bytes?: number;
}

/** Colours for owners: distinct hues, then the slot is picked by a hash of the node id. */
const PALETTE = [
  '#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b',
  '#e377c2', '#17becf', '#bcbd22', '#7f7f7f', '#393b79', '#637939',
];
/** Partitions without an owner (before the first map). */
export const UNOWNED = '#d0d0d0';

function hash(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) {
    h ^= s.charCodeAt(i);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h;
}

/**
 * A colour per node id: the palette slot named by the id's hash, or the next free one
 * when two ids of `ids` collide (ids are placed in sorted order, so the answer depends
 * only on the set of ids). Past the palette's size, a hue from the hash.
 */
export function nodeColours(ids: Iterable<string>): Map<string, string> {
  const sorted = [...new Set(ids)].filter((id) => id !== '').sort();
  const taken = new Set<number>();
  const out = new Map<string, string>();
  for (const id of sorted) {
    const h = hash(id);
    if (taken.size >= PALETTE.length) {
      out.set(id, `hsl(${h % 360}, 65%, 45%)`);
      continue;
    }
    let slot = h % PALETTE.length;
    while (taken.has(slot)) slot = (slot + 1) % PALETTE.length;
    taken.add(slot);
    out.set(id, PALETTE[slot]!);
  }
  return out;
}

/** Geometry of the grid in CSS pixels. */
export interface Grid {
  cols: number;
  rows: number;
  cell: number;
  gap: number;
}

export function grid(partitions: number, width: number): Grid {
  const cols = Math.max(1, Math.ceil(Math.sqrt(partitions)));
  const rows = Math.max(1, Math.ceil(partitions / cols));
  const pitch = Math.max(2, Math.min(32, Math.floor(width / cols)));
  const gap = pitch >= 8 ? 1 : 0;
  return { cols, rows, cell: pitch - gap, gap };
}

function el<K extends keyof HTMLElementTagNameMap>(tag: K, props: Partial<HTMLElementTagNameMap[K]> = {}, ...kids: (Node | string)[]): HTMLElementTagNameMap[K] {
  const e = Object.assign(document.createElement(tag), props);
  e.append(...kids);
  return e;
}

export class ClusterView {
  private last: ClusterJson | undefined;
  private colours = new Map<string, string>();
  private geometry: Grid | undefined;
  private timer: ReturnType<typeof setInterval> | undefined;
  readonly canvas: HTMLCanvasElement;
  private readonly summary: HTMLElement;
  private readonly legend: HTMLElement;
  private readonly bars: HTMLElement;
  private readonly tip: HTMLElement;
  /** Bumped by each successful poll (tests wait on it). */
  polls = 0;

  /** The last /api/v1/cluster answer drawn. */
  get data(): ClusterJson | undefined {
    return this.last;
  }

  constructor(private readonly root: HTMLElement, private readonly url = '/api/v1/cluster') {
    this.summary = el('div', { id: 'cluster-summary' });
    this.canvas = el('canvas', { id: 'cluster-map' });
    this.tip = el('div', { id: 'cluster-tip', className: 'hint' }, 'hover a cell for its partition');
    this.legend = el('ul', { id: 'cluster-legend' });
    this.bars = el('div', { id: 'cluster-bars' });
    const expand = el('button', { id: 'cluster-expand', type: 'button', textContent: 'enlarge' });
    expand.onclick = () => {
      const big = document.body.classList.toggle('cluster-big');
      expand.textContent = big ? 'shrink' : 'enlarge';
      this.draw();
    };
    root.replaceChildren(this.summary, this.canvas, this.tip, this.legend, this.bars, expand);
    this.canvas.addEventListener('mousemove', (e) => this.hover(e));
    window.addEventListener('resize', () => this.draw());
  }

  start(everyMs: number): void {
    void this.refresh();
    this.timer = setInterval(() => void this.refresh(), everyMs);
  }

  stop(): void {
    if (this.timer !== undefined) clearInterval(this.timer);
  }

  async refresh(): Promise<void> {
    try {
      const r = await fetch(this.url, { cache: 'no-store' });
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      this.show((await r.json()) as ClusterJson);
    } catch (e) {
      this.root.dataset.error = String(e);
      this.summary.textContent = `cluster view unavailable: ${String(e)}`;
    }
  }

  show(v: ClusterJson): void {
    this.last = v;
    this.polls++;
    delete this.root.dataset.error;
    const owners = v.owners ?? [];
    const ids = new Set<string>([...(v.nodes ?? []).map((n) => n.id), ...owners]);
    this.colours = nodeColours(ids);
    this.root.dataset.mode = v.mode ?? 'unknown';
    this.root.dataset.epoch = String(v.epoch ?? '');
    this.root.dataset.partitions = String(owners.length);
    this.renderSummary(v);
    this.renderLegend(v);
    this.renderBars(v);
    this.draw();
  }

  /** Under-replicated partitions: an ISR shorter than the replica list. */
  underReplicated(v: ClusterJson = this.last ?? {}): number[] {
    const out: number[] = [];
    const replicas = v.replicas ?? [];
    const isr = v.isr ?? [];
    for (let p = 0; p < replicas.length; p++) {
      if ((isr[p]?.length ?? 0) < (replicas[p]?.length ?? 0)) out.push(p);
    }
    return out;
  }

  private renderSummary(v: ClusterJson): void {
    const standalone = v.mode === 'standalone';
    const under = this.underReplicated(v).length;
    const parts: (Node | string)[] = [];
    parts.push(el('strong', { id: 'cluster-mode' }, standalone ? 'standalone' : `cluster ${v.cluster ?? ''}`));
    parts.push(` · map epoch `, el('span', { id: 'cluster-epoch' }, String(v.epoch ?? '?')));
    parts.push(` · P = ${v.owners?.length ?? v.partitions ?? '?'}`);
    parts.push(el('br'), 'leader ', el('span', { id: 'cluster-leader' }, v.leader ?? 'none'));
    if (!standalone) {
      parts.push(` · this page's node ${v.node ?? '?'}`);
      if (v.etcd_connected === false) parts.push(el('span', { className: 'err' }, ' · etcd unreachable'));
      if ((v.replicas ?? []).length) {
        parts.push(el('br'), el('span', { id: 'cluster-under', className: under ? 'err' : '' }, `${under} under-replicated`));
      } else {
        parts.push(el('br'), 'one copy per partition (no replicas)');
      }
    } else {
      parts.push(el('br'), el('span', { className: 'hint' }, 'no etcd: this node owns every partition'));
    }
    if (v.last_error) parts.push(el('br'), el('span', { className: 'err' }, `last error: ${v.last_error}`));
    this.summary.replaceChildren(...parts);
  }

  private renderLegend(v: ClusterJson): void {
    const items: HTMLElement[] = [];
    for (const [id, colour] of this.colours) {
      const sw = el('span', { className: 'swatch' });
      sw.style.background = colour;
      const li = el('li', {}, sw, id);
      li.dataset.node = id;
      li.dataset.colour = colour;
      if (id === v.leader) li.append(el('span', { className: 'leader-mark', title: 'cluster leader' }, ' ★ leader'));
      items.push(li);
    }
    if ((v.replicas ?? []).length) {
      const sw = el('span', { className: 'swatch under' });
      items.push(el('li', { className: 'hint' }, sw, 'corner mark: ISR smaller than replicas'));
    }
    this.legend.replaceChildren(...items);
  }

  private renderBars(v: ClusterJson): void {
    const owners = v.owners ?? [];
    const total = Math.max(1, owners.length);
    const counts = new Map<string, number>();
    for (const o of owners) counts.set(o, (counts.get(o) ?? 0) + 1);
    const nodes = v.nodes ?? [];
    const loadOf = (id: string): LoadJson | undefined => v.loads?.[id] ?? nodes.find((n) => n.id === id)?.load;
    const maxRate = Math.max(1, ...nodes.map((n) => loadOf(n.id)?.msg_rate ?? 0));
    const rows: HTMLElement[] = [];
    for (const n of nodes) {
      const owned = counts.get(n.id) ?? 0;
      const row = el('div', { className: 'bar-row' });
      row.dataset.node = n.id;
      const label = el('span', { className: 'bar-label' }, n.id + (n.id === v.leader ? ' ★' : ''));
      const track = el('span', { className: 'bar-track' });
      const fill = el('span', { className: 'bar-fill' });
      fill.style.width = `${(100 * owned) / total}%`;
      fill.style.background = this.colours.get(n.id) ?? UNOWNED;
      track.append(fill);
      const load = loadOf(n.id);
      let text = `${owned} partitions`;
      if (n.state && n.state !== 'serving') text += ` · ${n.state}`;
      row.append(label, track, el('span', { className: 'bar-value' }, text));
      rows.push(row);
      if (load) {
        const lt = el('span', { className: 'bar-track' });
        const lf = el('span', { className: 'bar-fill load' });
        lf.style.width = `${(100 * (load.msg_rate ?? 0)) / maxRate}%`;
        lt.append(lf);
        const lrow = el('div', { className: 'bar-row' }, el('span', { className: 'bar-label' }, ''), lt,
          el('span', { className: 'bar-value' }, `${(load.msg_rate ?? 0).toFixed(1)} msg/s · ${load.connections ?? 0} conns`));
        rows.push(lrow);
      }
    }
    this.bars.replaceChildren(el('div', { className: 'hint' }, 'partitions owned per node'), ...rows);
  }

  /** Draws the grid at the canvas's current CSS width; a no-op before the first poll. */
  draw(): void {
    const v = this.last;
    if (!v) return;
    const owners = v.owners ?? [];
    const width = Math.max(64, this.canvas.parentElement?.clientWidth ?? 300);
    const g = grid(owners.length, width);
    this.geometry = g;
    const pitch = g.cell + g.gap;
    const cssW = g.cols * pitch;
    const cssH = g.rows * pitch;
    const dpr = window.devicePixelRatio || 1;
    this.canvas.style.width = `${cssW}px`;
    this.canvas.style.height = `${cssH}px`;
    this.canvas.width = Math.round(cssW * dpr);
    this.canvas.height = Math.round(cssH * dpr);
    Object.assign(this.canvas.dataset, { cols: g.cols, rows: g.rows, cell: g.cell, gap: g.gap, partitions: owners.length });
    const ctx = this.canvas.getContext('2d');
    if (!ctx) return;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.fillStyle = '#ffffff';
    ctx.fillRect(0, 0, cssW, cssH);
    const under = new Set(this.underReplicated(v));
    const mark = Math.max(1, Math.floor(g.cell / 2) - 1);
    for (let p = 0; p < owners.length; p++) {
      const x = (p % g.cols) * pitch;
      const y = Math.floor(p / g.cols) * pitch;
      ctx.fillStyle = this.colours.get(owners[p] ?? '') ?? UNOWNED;
      ctx.fillRect(x, y, g.cell, g.cell);
      if (under.has(p)) {
        // A black triangle in the top-left corner; the cell's centre keeps the owner colour.
        ctx.fillStyle = '#000000';
        ctx.beginPath();
        ctx.moveTo(x, y);
        ctx.lineTo(x + mark, y);
        ctx.lineTo(x, y + mark);
        ctx.closePath();
        ctx.fill();
      }
    }
  }

  private hover(e: MouseEvent): void {
    const v = this.last;
    const g = this.geometry;
    if (!v || !g) return;
    const r = this.canvas.getBoundingClientRect();
    const pitch = g.cell + g.gap;
    const col = Math.floor((e.clientX - r.left) / pitch);
    const row = Math.floor((e.clientY - r.top) / pitch);
    const p = row * g.cols + col;
    if (col < 0 || col >= g.cols || p < 0 || p >= (v.owners ?? []).length) return;
    const bits = [`partition ${p}: owner ${v.owners?.[p] || 'none'}`];
    if (v.replicas?.[p]) bits.push(`replicas ${v.replicas[p]!.join(',')}`);
    if (v.isr?.[p]) bits.push(`isr ${v.isr[p]!.join(',')}`);
    if (v.leader_epochs?.[p] !== undefined) bits.push(`leader epoch ${v.leader_epochs[p]}`);
    this.tip.textContent = bits.join(' · ');
  }
}
