// Reads a NumPy .npz archive (a zip of .npy files, as `np.savez` writes it) into typed arrays: what
// the viewer needs to read a head's splat binding file (h<i>_splats_binding.npz, docs/artifacts.md).

import { unzipSync } from 'fflate';

const DTYPES = {
  '<f4': Float32Array,
  '<f8': Float64Array,
  '<i4': Int32Array,
  '<u4': Uint32Array,
  '<i8': BigInt64Array,
  '|u1': Uint8Array,
  '|i1': Int8Array,
};

/**
 * Parse one .npy file (format versions 1-3, C order, little-endian numbers or `<U` strings).
 * @param {Uint8Array} bytes
 * @returns {{dtype: string, shape: number[], data: ArrayLike<number> | string}}
 */
export function parseNpy(bytes) {
  if (bytes[0] !== 0x93 || String.fromCharCode(...bytes.subarray(1, 6)) !== 'NUMPY') throw new Error('not a .npy file');
  const major = bytes[6];
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder().decode(bytes.subarray(start, start + headerLength));
  const descr = /'descr':\s*'([^']+)'/.exec(header)?.[1];
  const fortran = /'fortran_order':\s*(True|False)/.exec(header)?.[1];
  const shapeText = /'shape':\s*\(([^)]*)\)/.exec(header)?.[1];
  if (!descr || !fortran || shapeText === undefined) throw new Error('unreadable .npy header');
  if (fortran === 'True') throw new Error('Fortran-ordered arrays are not supported');
  const shape = shapeText.split(',').map((s) => s.trim()).filter(Boolean).map(Number);
  const count = shape.reduce((a, b) => a * b, 1);
  const offset = start + headerLength;
  if (descr.startsWith('<U')) {
    // Fixed-width UTF-32 strings; a 0-d array is one string.
    const width = Number(descr.slice(2));
    const chars = [];
    for (let i = 0; i < width * count; i++) {
      const code = view.getUint32(offset + 4 * i, true);
      if (code) chars.push(String.fromCodePoint(code));
    }
    return { dtype: descr, shape, data: chars.join('') };
  }
  const Type = DTYPES[descr];
  if (!Type) throw new Error(`unsupported dtype ${descr}`);
  const byteLength = count * Type.BYTES_PER_ELEMENT;
  if (offset + byteLength > bytes.byteLength) throw new Error('.npy data is truncated');
  // Copy into an aligned buffer (zip entries sit at arbitrary offsets).
  const data = new Type(bytes.slice(offset, offset + byteLength).buffer);
  return { dtype: descr, shape, data };
}

/**
 * @param {ArrayBuffer | Uint8Array} buffer
 * @returns {Record<string, {dtype: string, shape: number[], data: ArrayLike<number> | string}>}
 */
export function parseNpz(buffer) {
  const entries = unzipSync(buffer instanceof Uint8Array ? buffer : new Uint8Array(buffer));
  const arrays = {};
  for (const [name, bytes] of Object.entries(entries)) {
    if (name.endsWith('.npy')) arrays[name.slice(0, -4)] = parseNpy(bytes);
  }
  return arrays;
}
