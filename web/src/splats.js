// A small Gaussian splat renderer for three.js.
//
// It reads the 3DGS PLY layout (x, y, z, nx, ny, nz, f_dc_0..2, opacity as a logit, scale_0..2 as logs,
// rot_0..3 as a w-first quaternion), builds each splat's 3D covariance on the CPU, and draws one
// screen-aligned quad per splat whose shape is the covariance projected through the camera (the
// EWA approximation used by 3D Gaussian splatting). Splats are sorted back to front on the CPU
// whenever the view changes and blended with premultiplied alpha. It needs nothing beyond WebGL2
// (or WebGL1 with instancing), so it also runs on software rasterizers such as SwiftShader.

import * as THREE from 'three';

const SH_C0 = 0.28209479177387814;

const PLY_TYPES = {
  char: ['getInt8', 1], int8: ['getInt8', 1],
  uchar: ['getUint8', 1], uint8: ['getUint8', 1],
  short: ['getInt16', 2], int16: ['getInt16', 2],
  ushort: ['getUint16', 2], uint16: ['getUint16', 2],
  int: ['getInt32', 4], int32: ['getInt32', 4],
  uint: ['getUint32', 4], uint32: ['getUint32', 4],
  float: ['getFloat32', 4], float32: ['getFloat32', 4],
  double: ['getFloat64', 8], float64: ['getFloat64', 8],
};

/**
 * Parse a PLY file holding one splat per vertex.
 * @param {ArrayBuffer} buffer
 * @returns {{count: number, centers: Float32Array, colors: Float32Array, covariances: Float32Array}}
 */
export function parseSplatPly(buffer) {
  const bytes = new Uint8Array(buffer);
  const marker = 'end_header';
  let headerEnd = -1;
  const limit = Math.min(bytes.length, 64 * 1024);
  let text = '';
  for (let i = 0; i < limit; i++) text += String.fromCharCode(bytes[i]);
  const at = text.indexOf(marker);
  if (!text.startsWith('ply') || at < 0) throw new Error('not a PLY file');
  headerEnd = text.indexOf('\n', at) + 1;
  const lines = text.slice(0, headerEnd).split(/\r?\n/);

  let format = '';
  let count = 0;
  let inVertex = false;
  let stride = 0;
  const props = {};
  let elementsBefore = false;
  for (const line of lines) {
    const parts = line.trim().split(/\s+/);
    if (parts[0] === 'format') format = parts[1];
    else if (parts[0] === 'element') {
      inVertex = parts[1] === 'vertex';
      if (inVertex) count = parseInt(parts[2], 10);
      else if (count === 0) elementsBefore = true;
    } else if (parts[0] === 'property' && inVertex) {
      if (parts[1] === 'list') throw new Error('list properties are not supported for splats');
      const type = PLY_TYPES[parts[1]];
      if (!type) throw new Error(`unknown PLY type ${parts[1]}`);
      props[parts[2]] = { offset: stride, getter: type[0], index: Object.keys(props).length };
      stride += type[1];
    }
  }
  if (elementsBefore) throw new Error('the vertex element must come first');
  for (const name of ['x', 'y', 'z', 'opacity', 'scale_0', 'scale_1', 'scale_2', 'rot_0', 'rot_1', 'rot_2', 'rot_3']) {
    if (!(name in props)) throw new Error(`PLY lacks the "${name}" property`);
  }

  let read;
  if (format === 'binary_little_endian' || format === 'binary_big_endian') {
    const little = format === 'binary_little_endian';
    const view = new DataView(buffer, headerEnd);
    if (view.byteLength < count * stride) throw new Error('PLY is truncated');
    read = (i, name) => {
      const p = props[name];
      return view[p.getter](i * stride + p.offset, little);
    };
  } else if (format === 'ascii') {
    const body = new TextDecoder().decode(bytes.subarray(headerEnd)).trim().split(/\r?\n/);
    if (body.length < count) throw new Error('PLY is truncated');
    const rows = body.slice(0, count).map((l) => l.trim().split(/\s+/).map(Number));
    read = (i, name) => rows[i][props[name].index];
  } else {
    throw new Error(`unsupported PLY format ${format}`);
  }

  const hasDc = 'f_dc_0' in props && 'f_dc_1' in props && 'f_dc_2' in props;
  const hasRgb = 'red' in props && 'green' in props && 'blue' in props;
  const centers = new Float32Array(count * 3);
  const colors = new Float32Array(count * 4);
  const covariances = new Float32Array(count * 6);
  const clamp01 = (v) => (v < 0 ? 0 : v > 1 ? 1 : v);
  for (let i = 0; i < count; i++) {
    centers[3 * i] = read(i, 'x');
    centers[3 * i + 1] = read(i, 'y');
    centers[3 * i + 2] = read(i, 'z');

    let r = 0.5, g = 0.5, b = 0.5;
    if (hasDc) {
      r = 0.5 + SH_C0 * read(i, 'f_dc_0');
      g = 0.5 + SH_C0 * read(i, 'f_dc_1');
      b = 0.5 + SH_C0 * read(i, 'f_dc_2');
    } else if (hasRgb) {
      r = read(i, 'red') / 255;
      g = read(i, 'green') / 255;
      b = read(i, 'blue') / 255;
    }
    colors[4 * i] = clamp01(r);
    colors[4 * i + 1] = clamp01(g);
    colors[4 * i + 2] = clamp01(b);
    colors[4 * i + 3] = 1 / (1 + Math.exp(-read(i, 'opacity')));

    const sx = Math.exp(read(i, 'scale_0'));
    const sy = Math.exp(read(i, 'scale_1'));
    const sz = Math.exp(read(i, 'scale_2'));
    let w = read(i, 'rot_0'), x = read(i, 'rot_1'), y = read(i, 'rot_2'), z = read(i, 'rot_3');
    const n = Math.hypot(w, x, y, z) || 1;
    w /= n; x /= n; y /= n; z /= n;
    // Rotation matrix rows of the unit quaternion.
    const r00 = 1 - 2 * (y * y + z * z), r01 = 2 * (x * y - w * z), r02 = 2 * (x * z + w * y);
    const r10 = 2 * (x * y + w * z), r11 = 1 - 2 * (x * x + z * z), r12 = 2 * (y * z - w * x);
    const r20 = 2 * (x * z - w * y), r21 = 2 * (y * z + w * x), r22 = 1 - 2 * (x * x + y * y);
    // M = R * S; covariance = M * M^T.
    const m00 = r00 * sx, m01 = r01 * sy, m02 = r02 * sz;
    const m10 = r10 * sx, m11 = r11 * sy, m12 = r12 * sz;
    const m20 = r20 * sx, m21 = r21 * sy, m22 = r22 * sz;
    const o = 6 * i;
    covariances[o] = m00 * m00 + m01 * m01 + m02 * m02;
    covariances[o + 1] = m00 * m10 + m01 * m11 + m02 * m12;
    covariances[o + 2] = m00 * m20 + m01 * m21 + m02 * m22;
    covariances[o + 3] = m10 * m10 + m11 * m11 + m12 * m12;
    covariances[o + 4] = m10 * m20 + m11 * m21 + m12 * m22;
    covariances[o + 5] = m20 * m20 + m21 * m21 + m22 * m22;
  }
  return { count, centers, colors, covariances };
}

const vertexShader = /* glsl */ `
  attribute vec3 iCenter;
  attribute vec4 iColor;
  attribute vec3 iCovA;  // xx, xy, xz
  attribute vec3 iCovB;  // yy, yz, zz
  uniform vec2 viewport;
  varying vec4 vColor;
  varying vec2 vOffset;

  void main() {
    vec4 cam = modelViewMatrix * vec4(iCenter, 1.0);
    vec4 clip = projectionMatrix * cam;
    float limit = 1.2 * clip.w;
    if (cam.z > -1e-4 || abs(clip.x) > limit || abs(clip.y) > limit) {
      gl_Position = vec4(0.0, 0.0, 2.0, 1.0);
      return;
    }
    vec2 focal = vec2(projectionMatrix[0][0], projectionMatrix[1][1]) * viewport * 0.5;
    mat3 cov = mat3(iCovA.x, iCovA.y, iCovA.z,
                    iCovA.y, iCovB.x, iCovB.y,
                    iCovA.z, iCovB.y, iCovB.z);
    float z = cam.z;
    // Jacobian of the perspective projection (camera looks down -z), columns.
    mat3 J = mat3(focal.x / -z, 0.0, 0.0,
                  0.0, focal.y / -z, 0.0,
                  focal.x * cam.x / (z * z), focal.y * cam.y / (z * z), 0.0);
    mat3 T = J * mat3(modelViewMatrix);
    mat3 c2 = T * cov * transpose(T);
    // A small screen-space low-pass filter keeps sub-pixel splats visible.
    float a = c2[0][0] + 0.3;
    float b = c2[0][1];
    float c = c2[1][1] + 0.3;
    float mid = 0.5 * (a + c);
    float radius = length(vec2(0.5 * (a - c), b));
    float l1 = mid + radius;
    float l2 = max(mid - radius, 0.1);
    vec2 dir = abs(b) > 1e-8 ? normalize(vec2(b, l1 - a)) : (a >= c ? vec2(1.0, 0.0) : vec2(0.0, 1.0));
    vec2 major = min(3.0 * sqrt(l1), 2048.0) * dir;
    vec2 minor = min(3.0 * sqrt(l2), 2048.0) * vec2(dir.y, -dir.x);
    vColor = iColor;
    vOffset = position.xy * 3.0;  // in standard deviations
    vec2 px = position.x * major + position.y * minor;
    gl_Position = vec4(clip.xy + px * 2.0 / viewport * clip.w, clip.z, clip.w);
  }
`;

const fragmentShader = /* glsl */ `
  varying vec4 vColor;
  varying vec2 vOffset;

  void main() {
    float power = -0.5 * dot(vOffset, vOffset);
    float alpha = vColor.a * exp(power);
    if (alpha < 1.0 / 255.0) discard;
    alpha = min(alpha, 0.99);
    gl_FragColor = vec4(vColor.rgb * alpha, alpha);
  }
`;

/** A three.js object that draws splats; call `sort(camera)` before rendering when the view changed. */
export class SplatMesh extends THREE.Mesh {
  /** @param {{count: number, centers: Float32Array, colors: Float32Array, covariances: Float32Array}} data */
  constructor(data) {
    const geometry = new THREE.InstancedBufferGeometry();
    const quad = new Float32Array([-1, -1, 0, 1, -1, 0, 1, 1, 0, -1, 1, 0]);
    geometry.setAttribute('position', new THREE.BufferAttribute(quad, 3));
    geometry.setIndex([0, 1, 2, 0, 2, 3]);
    const n = data.count;
    const center = new THREE.InstancedBufferAttribute(new Float32Array(n * 3), 3);
    const color = new THREE.InstancedBufferAttribute(new Float32Array(n * 4), 4);
    const covA = new THREE.InstancedBufferAttribute(new Float32Array(n * 3), 3);
    const covB = new THREE.InstancedBufferAttribute(new Float32Array(n * 3), 3);
    for (const attr of [center, color, covA, covB]) attr.setUsage(THREE.DynamicDrawUsage);
    geometry.setAttribute('iCenter', center);
    geometry.setAttribute('iColor', color);
    geometry.setAttribute('iCovA', covA);
    geometry.setAttribute('iCovB', covB);
    geometry.instanceCount = n;

    const material = new THREE.ShaderMaterial({
      vertexShader,
      fragmentShader,
      uniforms: { viewport: { value: new THREE.Vector2(1, 1) } },
      transparent: true,
      depthWrite: false,
      depthTest: true,
      blending: THREE.CustomBlending,
      blendEquation: THREE.AddEquation,
      blendSrc: THREE.OneFactor,
      blendDst: THREE.OneMinusSrcAlphaFactor,
      blendSrcAlpha: THREE.OneFactor,
      blendDstAlpha: THREE.OneMinusSrcAlphaFactor,
      side: THREE.DoubleSide,
    });
    super(geometry, material);
    this.frustumCulled = false;
    this.data = data;
    this.order = new Uint32Array(n);
    this.depths = new Float32Array(n);
    this.lastView = null;
    this.geometry.boundingBox = new THREE.Box3();
    this.geometry.boundingBox.setFromArray(data.centers);
    this.geometry.boundingSphere = this.geometry.boundingBox.getBoundingSphere(new THREE.Sphere());
    this.writeOrder(Uint32Array.from({ length: n }, (_, i) => i));
  }

  /** Set the viewport size in device pixels. */
  setViewport(width, height) {
    this.material.uniforms.viewport.value.set(width, height);
  }

  /** Sort splats back to front for `camera` (a no-op when the view has not changed). */
  sort(camera) {
    this.updateMatrixWorld();
    const mv = new THREE.Matrix4().multiplyMatrices(camera.matrixWorldInverse, this.matrixWorld);
    const e = mv.elements;
    const key = [e[2], e[6], e[10], e[14]];
    if (this.lastView && key.every((v, i) => Math.abs(v - this.lastView[i]) < 1e-4)) return false;
    this.lastView = key;
    const { centers, count } = this.data;
    const depths = this.depths;
    let lo = Infinity, hi = -Infinity;
    for (let i = 0; i < count; i++) {
      const d = e[2] * centers[3 * i] + e[6] * centers[3 * i + 1] + e[10] * centers[3 * i + 2] + e[14];
      depths[i] = d;
      if (d < lo) lo = d;
      if (d > hi) hi = d;
    }
    // Counting sort on 16-bit depth keys: most negative view z (farthest) first.
    const buckets = 65536;
    const scale = hi > lo ? (buckets - 1) / (hi - lo) : 0;
    const counts = new Uint32Array(buckets);
    const keys = new Uint16Array(count);
    for (let i = 0; i < count; i++) {
      const k = ((depths[i] - lo) * scale) | 0;
      keys[i] = k;
      counts[k]++;
    }
    for (let k = 1; k < buckets; k++) counts[k] += counts[k - 1];
    const order = this.order;
    for (let i = count - 1; i >= 0; i--) order[--counts[keys[i]]] = i;
    this.writeOrder(order);
    return true;
  }

  writeOrder(order) {
    const { centers, colors, covariances } = this.data;
    const g = this.geometry;
    const c = g.attributes.iCenter.array;
    const col = g.attributes.iColor.array;
    const a = g.attributes.iCovA.array;
    const b = g.attributes.iCovB.array;
    for (let j = 0; j < order.length; j++) {
      const i = order[j];
      c[3 * j] = centers[3 * i];
      c[3 * j + 1] = centers[3 * i + 1];
      c[3 * j + 2] = centers[3 * i + 2];
      col[4 * j] = colors[4 * i];
      col[4 * j + 1] = colors[4 * i + 1];
      col[4 * j + 2] = colors[4 * i + 2];
      col[4 * j + 3] = colors[4 * i + 3];
      a[3 * j] = covariances[6 * i];
      a[3 * j + 1] = covariances[6 * i + 1];
      a[3 * j + 2] = covariances[6 * i + 2];
      b[3 * j] = covariances[6 * i + 3];
      b[3 * j + 1] = covariances[6 * i + 4];
      b[3 * j + 2] = covariances[6 * i + 5];
    }
    for (const name of ['iCenter', 'iColor', 'iCovA', 'iCovB']) g.attributes[name].needsUpdate = true;
  }

  dispose() {
    this.geometry.dispose();
    this.material.dispose();
  }
}
