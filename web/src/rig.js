// Splats bound to an animated mesh, in the browser: the binding file (h<i>_splats_binding.npz; format
// in docs/artifacts.md, math in headforge/pipeline/rig.py) applied to the GLB's morphed vertices.
//
// Each splat sits on a triangle (index into the binding's `faces`, the OBJ's vertex order). The GLB
// keeps the OBJ's triangles in the same order but splits vertices at UV seams, so triangle t of the
// GLB's index buffer is the binding's triangle t with its corners renumbered; the constructor checks
// that every OBJ vertex maps onto GLB vertices at one position. Per frame: the GLB vertices morphed
// (base + Σ w_k · delta_k, as three.js does on the GPU), then for each splat the frame R = [t b n] of
// its triangle and size σ = sqrt(|e1 × e2|):
//   centre = Σ bary_i v_i + offset · n,   rotation = R · R_local,   scale = scale_local · σ.

export const BINDING_FORMAT = 'headforge-splat-binding/1';

/**
 * Check a parsed binding archive (see npz.js) and return its arrays.
 * @param {Record<string, {shape: number[], data: any}>} arrays
 */
export function readBinding(arrays) {
  const need = ['format', 'triangle', 'barycentric', 'normal_offset', 'rotation', 'scale', 'faces', 'vertex_count'];
  for (const name of need) if (!(name in arrays)) throw new Error(`the splat binding lacks "${name}"`);
  if (arrays.format.data !== BINDING_FORMAT) throw new Error(`not a ${BINDING_FORMAT} file`);
  const count = arrays.triangle.shape[0];
  const shapes = { barycentric: [count, 3], normal_offset: [count], rotation: [count, 4], scale: [count, 3] };
  for (const [name, shape] of Object.entries(shapes)) {
    if (arrays[name].shape.join() !== shape.join()) throw new Error(`splat binding ${name} has shape ${arrays[name].shape}`);
  }
  const faces = arrays.faces.data;
  const triangles = arrays.triangle.data;
  const faceCount = arrays.faces.shape[0];
  for (let i = 0; i < count; i++) {
    if (triangles[i] < 0 || triangles[i] >= faceCount) throw new Error('splat binding triangles do not index its faces');
  }
  return {
    count,
    triangles,
    barycentrics: arrays.barycentric.data,
    offsets: arrays.normal_offset.data,
    rotations: arrays.rotation.data,
    scales: arrays.scale.data,
    faces,
    vertexCount: Number(arrays.vertex_count.data[0]),
  };
}

export class SplatRig {
  /**
   * @param {ReturnType<typeof readBinding>} binding
   * @param {import('three').BufferGeometry} geometry the GLB primitive (indexed, with relative morph targets)
   */
  constructor(binding, geometry) {
    const index = geometry.index?.array;
    const base = geometry.attributes.position.array;
    if (!index || index.length !== binding.faces.length) throw new Error('the splat binding was made for a different mesh');
    const glbOf = new Int32Array(binding.vertexCount).fill(-1);
    for (let c = 0; c < index.length; c++) {
      const obj = binding.faces[c];
      const glb = index[c];
      if (obj < 0 || obj >= binding.vertexCount) throw new Error('splat binding faces are out of range');
      const seen = glbOf[obj];
      if (seen < 0) glbOf[obj] = glb;
      else if (seen !== glb) {
        for (let a = 0; a < 3; a++) {
          if (Math.abs(base[3 * seen + a] - base[3 * glb + a]) > 1e-6) {
            throw new Error('the splat binding was made for a different mesh (its triangles do not match the GLB\'s)');
          }
        }
      }
    }
    this.binding = binding;
    this.count = binding.count;
    this.base = base;
    this.deltas = (geometry.morphAttributes.position ?? []).map((attribute) => attribute.array);
    this.vertices = new Float32Array(base.length);
    this.corners = new Uint32Array(3 * binding.count);
    for (let i = 0; i < binding.count; i++) {
      const t = binding.triangles[i];
      for (let k = 0; k < 3; k++) this.corners[3 * i + k] = index[3 * t + k];
    }
    // Local rotations as row-major 3x3 matrices (quaternions are w, x, y, z).
    this.local = new Float32Array(9 * binding.count);
    for (let i = 0; i < binding.count; i++) {
      const q = binding.rotations.subarray(4 * i, 4 * i + 4);
      const n = Math.hypot(q[0], q[1], q[2], q[3]) || 1;
      const w = q[0] / n, x = q[1] / n, y = q[2] / n, z = q[3] / n;
      this.local.set([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
      ], 9 * i);
    }
    this.centers = new Float32Array(3 * binding.count);
    this.quaternions = new Float32Array(4 * binding.count); // x, y, z, w (three.js order)
    this.sizes = new Float32Array(3 * binding.count);
  }

  /** Morph the mesh's vertices with `weights` (one per morph target) into `this.vertices`. */
  morph(weights) {
    const v = this.vertices;
    v.set(this.base);
    this.deltas.forEach((delta, k) => {
      const w = weights[k];
      if (!w) return;
      for (let j = 0; j < v.length; j++) v[j] += w * delta[j];
    });
    return v;
  }

  /** Pose every splat on the mesh morphed by `weights`: fills centers, quaternions and sizes. */
  pose(weights) {
    const v = this.morph(weights);
    const { barycentrics: bary, offsets, scales } = this.binding;
    const c = this.corners;
    const L = this.local;
    for (let i = 0; i < this.count; i++) {
      const i0 = 3 * c[3 * i], i1 = 3 * c[3 * i + 1], i2 = 3 * c[3 * i + 2];
      const ax = v[i1] - v[i0], ay = v[i1 + 1] - v[i0 + 1], az = v[i1 + 2] - v[i0 + 2];
      const bx = v[i2] - v[i0], by = v[i2 + 1] - v[i0 + 1], bz = v[i2 + 2] - v[i0 + 2];
      let nx = ay * bz - az * by, ny = az * bx - ax * bz, nz = ax * by - ay * bx;
      const area2 = Math.hypot(nx, ny, nz) || 1e-30;
      nx /= area2; ny /= area2; nz /= area2;
      const el = Math.hypot(ax, ay, az) || 1e-30;
      const tx = ax / el, ty = ay / el, tz = az / el;
      const sx = ny * tz - nz * ty, sy = nz * tx - nx * tz, sz = nx * ty - ny * tx; // b = n × t
      const w0 = bary[3 * i], w1 = bary[3 * i + 1], w2 = bary[3 * i + 2];
      const o = offsets[i];
      this.centers[3 * i] = w0 * v[i0] + w1 * v[i1] + w2 * v[i2] + o * nx;
      this.centers[3 * i + 1] = w0 * v[i0 + 1] + w1 * v[i1 + 1] + w2 * v[i2 + 1] + o * ny;
      this.centers[3 * i + 2] = w0 * v[i0 + 2] + w1 * v[i1 + 2] + w2 * v[i2 + 2] + o * nz;
      // R = [t b n] (columns) times the local rotation.
      const l = 9 * i;
      const m00 = tx * L[l] + sx * L[l + 3] + nx * L[l + 6];
      const m01 = tx * L[l + 1] + sx * L[l + 4] + nx * L[l + 7];
      const m02 = tx * L[l + 2] + sx * L[l + 5] + nx * L[l + 8];
      const m10 = ty * L[l] + sy * L[l + 3] + ny * L[l + 6];
      const m11 = ty * L[l + 1] + sy * L[l + 4] + ny * L[l + 7];
      const m12 = ty * L[l + 2] + sy * L[l + 5] + ny * L[l + 8];
      const m20 = tz * L[l] + sz * L[l + 3] + nz * L[l + 6];
      const m21 = tz * L[l + 1] + sz * L[l + 4] + nz * L[l + 7];
      const m22 = tz * L[l + 2] + sz * L[l + 5] + nz * L[l + 8];
      writeQuaternion(this.quaternions, 4 * i, m00, m01, m02, m10, m11, m12, m20, m21, m22);
      const sigma = Math.sqrt(area2);
      this.sizes[3 * i] = scales[3 * i] * sigma;
      this.sizes[3 * i + 1] = scales[3 * i + 1] * sigma;
      this.sizes[3 * i + 2] = scales[3 * i + 2] * sigma;
    }
  }
}

/** Unit quaternion (x, y, z, w) of a rotation matrix (Shepperd: the best-conditioned formula). */
function writeQuaternion(out, o, m00, m01, m02, m10, m11, m12, m20, m21, m22) {
  const trace = m00 + m11 + m22;
  let w, x, y, z;
  if (trace >= m00 && trace >= m11 && trace >= m22) {
    w = 1 + trace; x = m21 - m12; y = m02 - m20; z = m10 - m01;
  } else if (m00 >= m11 && m00 >= m22) {
    w = m21 - m12; x = 1 + m00 - m11 - m22; y = m01 + m10; z = m02 + m20;
  } else if (m11 >= m22) {
    w = m02 - m20; x = m01 + m10; y = 1 - m00 + m11 - m22; z = m12 + m21;
  } else {
    w = m10 - m01; x = m02 + m20; y = m12 + m21; z = 1 - m00 - m11 + m22;
  }
  let n = Math.hypot(w, x, y, z) || 1;
  if (w < 0) n = -n;
  out[o] = x / n; out[o + 1] = y / n; out[o + 2] = z / n; out[o + 3] = w / n;
}
