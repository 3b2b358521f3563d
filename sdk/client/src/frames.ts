// Splitting a received text frame into protocol objects.
//
// It owns the JSON-lines rule: a frame may carry several JSON objects separated by "\n"
// (the server packs pushes when `connect` asked for `batch`), and each non-empty line is
// parsed on its own. It must never drop the good lines of a frame because one is bad:
// a bad line is reported to `onBad` and the rest still come out.

/** Parses every non-empty line of `text`; lines that are not a JSON object go to `onBad`. */
export function parseFrame(text: string, onBad: (line: string, err: unknown) => void): Record<string, unknown>[] {
  const out: Record<string, unknown>[] = [];
  for (const line of text.split('\n')) {
    if (line.trim() === '') continue;
    try {
      const value: unknown = JSON.parse(line);
      if (value !== null && typeof value === 'object' && !Array.isArray(value)) {
        out.push(value as Record<string, unknown>);
      } else {
        onBad(line, new Error('not a JSON object'));
      }
    } catch (err) {
      onBad(line, err);
    }
  }
  return out;
}
