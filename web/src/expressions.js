// The viewer's built-in expression sequence: morph-target weights over time, looping. Weights are in
// FLAME's units (standard deviations of expression component k, added to the fitted head; jaw_open
// 1 = 0.35 rad), so the same numbers drive the GLB's morph targets and the bound splats.

/** Keyframes: time in seconds, weights by morph target name (missing names are 0). */
export const BUILT_IN_SEQUENCE = {
  name: 'built-in: talk and smile',
  duration: 4,
  keys: [
    { t: 0, weights: {} },
    { t: 0.8, weights: { expression_0: 2.0, expression_1: 1.0 } },
    { t: 1.6, weights: { jaw_open: 0.8, expression_2: -1.5 } },
    { t: 2.4, weights: { expression_1: -2.0, expression_3: 1.5, jaw_open: 0.3 } },
    { t: 3.2, weights: { expression_0: -1.5, expression_4: 1.5 } },
    { t: 4, weights: {} },
  ],
};

const smooth = (x) => x * x * (3 - 2 * x);

/**
 * The weights at time `t` (seconds, looping) for morph targets `names`, eased between keyframes.
 * @param {number} t
 * @param {string[]} names
 * @param {typeof BUILT_IN_SEQUENCE} sequence
 * @returns {Float32Array}
 */
export function weightsAt(t, names, sequence = BUILT_IN_SEQUENCE) {
  const { keys, duration } = sequence;
  const time = ((t % duration) + duration) % duration;
  let k = 0;
  while (k < keys.length - 2 && keys[k + 1].t <= time) k++;
  const a = keys[k];
  const b = keys[k + 1];
  const f = smooth(Math.min(1, Math.max(0, (time - a.t) / (b.t - a.t))));
  const out = new Float32Array(names.length);
  names.forEach((name, i) => {
    out[i] = (a.weights[name] ?? 0) * (1 - f) + (b.weights[name] ?? 0) * f;
  });
  return out;
}
