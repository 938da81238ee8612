// The 3D viewer: one three.js canvas showing either a head's textured GLB or its Gaussian splats
// (drawn by Spark, @sparkjsdev/spark). It renders on demand (after loads, orbiting, resizes and when
// Spark finishes a sort) rather than in a loop, which keeps an idle tab cheap and makes the drawing
// buffer stable for anyone reading it back; while an expression sequence plays it renders every frame.
//
// A FLAME head's GLB carries expression morph targets and its splats a binding file: then the viewer
// can play the built-in expression sequence (expressions.js) on both, the mesh through three.js's
// morph targets and the splats re-posed on the morphed mesh each frame (rig.js).

import * as THREE from 'three';
import { GLTFLoader } from 'three/examples/jsm/loaders/GLTFLoader.js';
import { OrbitControls } from 'three/examples/jsm/controls/OrbitControls.js';
import { SparkRenderer, SplatMesh, utils as sparkUtils } from '@sparkjsdev/spark';
import { BUILT_IN_SEQUENCE, weightsAt } from './expressions.js';
import { parseNpz } from './npz.js';
import { SplatRig, readBinding } from './rig.js';

const nextFrame = () => new Promise((resolve) => requestAnimationFrame(resolve));

export const BACKGROUND = 0x1e2430;

export class HeadViewer {
  /**
   * @param {HTMLElement} container
   * @param {(text: string) => void} onStatus
   */
  constructor(container, onStatus) {
    this.container = container;
    this.onStatus = onStatus;
    this.onAnimation = () => {};
    this.mode = 'mesh';
    this.objects = { mesh: null, splats: null };
    this.loadToken = 0;
    this.settleToken = 0;
    this.animation = null;

    this.renderer = new THREE.WebGLRenderer({ antialias: true, preserveDrawingBuffer: true });
    this.renderer.setPixelRatio(Math.min(window.devicePixelRatio || 1, 2));
    this.renderer.outputColorSpace = THREE.SRGBColorSpace;
    this.renderer.setClearColor(BACKGROUND, 1);
    this.canvas = this.renderer.domElement;
    this.canvas.id = 'viewer-canvas';
    this.canvas.dataset.state = 'empty';
    this.canvas.dataset.mode = this.mode;
    container.prepend(this.canvas);

    this.scene = new THREE.Scene();
    this.camera = new THREE.PerspectiveCamera(30, 4 / 3, 0.001, 100);
    this.scene.add(new THREE.HemisphereLight(0xffffff, 0x404050, 1.6));
    this.headlight = new THREE.DirectionalLight(0xffffff, 1.6);
    this.camera.add(this.headlight);
    this.headlight.position.set(0.3, 0.4, 1);
    this.scene.add(this.camera);
    // Spark draws every SplatMesh in the scene; it calls onDirty when a sort finishes.
    this.spark = new SparkRenderer({ renderer: this.renderer, onDirty: () => this.requestRender() });
    this.scene.add(this.spark);

    this.controls = new OrbitControls(this.camera, this.canvas);
    this.controls.enableDamping = false;
    this.controls.addEventListener('change', () => this.render());
    container.addEventListener('keydown', (event) => this.onKey(event));

    this.resizeObserver = new ResizeObserver(() => this.resize());
    this.resizeObserver.observe(container);
    this.resize();
  }

  resize() {
    const rect = this.container.getBoundingClientRect();
    const width = Math.max(1, Math.round(rect.width));
    const height = Math.max(1, Math.round(rect.height));
    this.renderer.setSize(width, height, false);
    this.camera.aspect = width / height;
    this.camera.updateProjectionMatrix();
    this.render();
  }

  clear() {
    this.loadToken++;
    this.stopAnimation();
    this.animation = null;
    this.binding = null;
    this.onAnimation(false);
    this.canvas.dataset.animation = 'none';
    for (const key of ['mesh', 'splats']) {
      const obj = this.objects[key];
      if (!obj) continue;
      this.scene.remove(obj);
      if (obj instanceof SplatMesh) {
        obj.dispose();
        this.objects[key] = null;
        continue;
      }
      obj.traverse?.((child) => {
        child.geometry?.dispose();
        const mats = Array.isArray(child.material) ? child.material : child.material ? [child.material] : [];
        for (const m of mats) {
          for (const v of Object.values(m)) if (v && v.isTexture) v.dispose();
          m.dispose();
        }
      });
      this.objects[key] = null;
    }
    this.sources = null;
    this.errors = {};
    this.canvas.dataset.state = 'empty';
    this.render();
  }

  /**
   * Show one head. The artifacts load in the background; the current mode shows as soon as it is ready.
   * @param {{mesh: string | null, splats: string | null, binding?: string | null}} urls
   * @param {(url: string) => Promise<ArrayBuffer>} fetchBytes
   */
  async show(urls, fetchBytes) {
    this.clear();
    const token = this.loadToken;
    this.sources = urls;
    this.fetchBytes = fetchBytes;
    this.framed = false;
    this.status = { mesh: urls.mesh ? 'loading' : 'missing', splats: urls.splats ? 'loading' : 'missing' };
    this.updateState();
    const jobs = [];
    if (urls.mesh) jobs.push(this.loadMesh(urls.mesh, token));
    if (urls.splats) jobs.push(this.loadSplats(urls.splats, token));
    if (urls.binding) jobs.push(this.loadBinding(urls.binding, token));
    await Promise.allSettled(jobs);
    if (token === this.loadToken) this.prepareAnimation();
  }

  async loadBinding(url, token) {
    try {
      const binding = readBinding(parseNpz(await this.fetchBytes(url)));
      if (token === this.loadToken) this.binding = binding;
    } catch (err) {
      if (token === this.loadToken) this.bindingError = String(err.message || err);
    }
  }

  async loadMesh(url, token) {
    try {
      const bytes = await this.fetchBytes(url);
      const gltf = await new GLTFLoader().parseAsync(bytes, '');
      if (token !== this.loadToken) return;
      this.objects.mesh = gltf.scene;
      this.status.mesh = 'ready';
      this.scene.add(gltf.scene);
    } catch (err) {
      if (token !== this.loadToken) return;
      this.status.mesh = 'failed';
      this.errors = { ...this.errors, mesh: String(err.message || err) };
    }
    this.updateState();
  }

  async loadSplats(url, token) {
    try {
      const bytes = await this.fetchBytes(url);
      const splats = new SplatMesh({ fileBytes: bytes, fileName: 'splats.ply' });
      await splats.initialized;
      if (token !== this.loadToken) {
        splats.dispose();
        return;
      }
      this.objects.splats = splats;
      this.status.splats = 'ready';
      this.scene.add(splats);
    } catch (err) {
      if (token !== this.loadToken) return;
      this.status.splats = 'failed';
      this.errors = { ...this.errors, splats: String(err.message || err) };
    }
    this.updateState();
  }

  setMode(mode) {
    this.mode = mode;
    this.canvas.dataset.mode = mode;
    this.updateState();
  }

  updateState() {
    const s = this.status?.[this.mode];
    if (this.objects.mesh) this.objects.mesh.visible = this.mode === 'mesh';
    if (this.objects.splats) this.objects.splats.visible = this.mode === 'splats';
    if (!this.framed && (this.objects.mesh || this.objects.splats)) this.frame();
    const label = this.mode === 'mesh' ? 'textured mesh' : 'Gaussian splats';
    if (!s) this.onStatus('');
    else if (s === 'loading') this.onStatus(`Loading the ${label}…`);
    else if (s === 'missing') this.onStatus(`This head has no ${label}.`);
    else if (s === 'failed') this.onStatus(`Could not show the ${label}: ${this.errors?.[this.mode] ?? 'unknown error'}`);
    else {
      const count = this.mode === 'splats' ? `${this.objects.splats.packedSplats.numSplats.toLocaleString()} splats. ` : '';
      this.onStatus(`${count}Drag to orbit, scroll or pinch to zoom.`);
    }
    this.render();
    // data-state tells scripts (and tests) that the current mode has been drawn; for splats that is
    // once Spark has sorted them for this view.
    const token = ++this.settleToken;
    if (s === 'ready' && this.mode === 'splats') {
      this.canvas.dataset.state = 'drawing';
      this.settle().then(() => {
        if (token === this.settleToken) this.canvas.dataset.state = 'ready';
      });
    } else {
      this.canvas.dataset.state = s ?? 'empty';
    }
  }

  /** Render frames until Spark has no sort or update pending (at most ~10 s). */
  async settle() {
    let quiet = 0;
    for (let i = 0; i < 600 && quiet < 3; i++) {
      this.render();
      await nextFrame();
      quiet = this.spark.sorting || this.spark.sortDirty ? 0 : quiet + 1;
    }
    this.render();
  }

  requestRender() {
    if (this.renderPending) return;
    this.renderPending = true;
    requestAnimationFrame(() => {
      this.renderPending = false;
      this.render();
    });
  }

  // ---------------------------------------------------------------- expression animation

  /** Set up the expression player when the mesh has morph targets (and the splats a binding). */
  prepareAnimation() {
    const root = this.objects.mesh;
    if (!root) return;
    let morphMesh = null;
    root.traverse((child) => {
      if (!morphMesh && child.isMesh && child.morphTargetInfluences?.length && child.morphTargetDictionary) morphMesh = child;
    });
    if (!morphMesh) return;
    const names = [];
    for (const [name, index] of Object.entries(morphMesh.morphTargetDictionary)) names[index] = name;
    let rig = null;
    const splats = this.objects.splats;
    if (splats && this.binding) {
      try {
        rig = new SplatRig(this.binding, morphMesh.geometry);
        if (rig.count !== splats.packedSplats.numSplats) throw new Error('the splat binding and the splat PLY differ in count');
      } catch (err) {
        rig = null;
        this.bindingError = String(err.message || err);
      }
    }
    this.animation = { morphMesh, names, rig, playing: false, time: 0, sequence: BUILT_IN_SEQUENCE.name };
    this.canvas.dataset.animation = 'paused';
    this.canvas.dataset.animatedSplats = rig ? 'bound' : 'static';
    this.onAnimation(true);
  }

  /** Pose the mesh and the bound splats for time `t` (seconds into the built-in sequence). */
  applyAnimation(t) {
    const anim = this.animation;
    if (!anim) return null;
    const weights = weightsAt(t, anim.names);
    for (let i = 0; i < weights.length; i++) anim.morphMesh.morphTargetInfluences[i] = weights[i];
    const splats = this.objects.splats;
    if (anim.rig && splats) {
      const rig = anim.rig;
      rig.pose(weights);
      const packed = splats.packedSplats;
      const array = packed.packedArray;
      const encoding = packed.splatEncoding;
      const { centers: c, sizes: s, quaternions: q } = rig;
      for (let i = 0; i < rig.count; i++) {
        sparkUtils.setPackedSplatCenter(array, i, c[3 * i], c[3 * i + 1], c[3 * i + 2]);
        sparkUtils.setPackedSplatScales(array, i, s[3 * i], s[3 * i + 1], s[3 * i + 2], encoding);
        sparkUtils.setPackedSplatQuat(array, i, q[4 * i], q[4 * i + 1], q[4 * i + 2], q[4 * i + 3]);
      }
      packed.needsUpdate = true;
      splats.updateVersion();
    }
    anim.time = t;
    this.canvas.dataset.animationTime = t.toFixed(3);
    return weights;
  }

  get playing() {
    return Boolean(this.animation?.playing);
  }

  play() {
    const anim = this.animation;
    if (!anim || anim.playing) return;
    anim.playing = true;
    const start = performance.now() - anim.time * 1000;
    this.canvas.dataset.animation = 'playing';
    this.renderer.setAnimationLoop((now) => {
      this.applyAnimation((now - start) / 1000);
      this.render();
    });
  }

  stopAnimation() {
    this.renderer.setAnimationLoop(null);
    if (this.animation) {
      this.animation.playing = false;
      this.canvas.dataset.animation = 'paused';
    }
  }

  togglePlay() {
    if (this.playing) this.stopAnimation();
    else this.play();
    return this.playing;
  }

  /**
   * For scripts and tests: pause at time `t`, draw it, and report the morph weights, the first
   * `count` splat centres as posed (float32) and as Spark stores them (float16), and a few vertices.
   */
  async seek(t, count = 64) {
    this.stopAnimation();
    const weights = this.applyAnimation(t);
    if (!weights) return null;
    await this.settle();
    const anim = this.animation;
    const packed = this.objects.splats?.packedSplats;
    const stored = [];
    if (packed && anim.rig) {
      for (let i = 0; i < Math.min(count, anim.rig.count); i++) {
        const { center } = sparkUtils.unpackSplat(packed.packedArray, i, packed.splatEncoding);
        stored.push(center.x, center.y, center.z);
      }
    }
    return {
      time: t,
      names: anim.names,
      weights: Array.from(weights),
      centers: anim.rig ? Array.from(anim.rig.centers.subarray(0, 3 * count)) : [],
      storedCenters: stored,
      splatsBound: Boolean(anim.rig),
      bindingError: this.bindingError ?? null,
      vertices: anim.rig ? Array.from(anim.rig.vertices.subarray(0, 30)) : [],
    };
  }

  /** Point the camera at whatever is loaded, from the front (+Z), at a distance that fits it. */
  frame() {
    const box = new THREE.Box3();
    for (const obj of [this.objects.mesh, this.objects.splats]) {
      if (!obj) continue;
      if (obj instanceof SplatMesh) box.union(obj.getBoundingBox(true));
      else box.expandByObject(obj);
    }
    if (box.isEmpty()) return;
    this.framed = true;
    const sphere = box.getBoundingSphere(new THREE.Sphere());
    const radius = Math.max(sphere.radius, 1e-3);
    const fov = THREE.MathUtils.degToRad(this.camera.fov);
    const distance = (radius / Math.sin(Math.min(fov, fov * this.camera.aspect) / 2)) * 1.05;
    this.camera.near = distance / 100;
    this.camera.far = distance * 100;
    this.camera.position.set(sphere.center.x, sphere.center.y, sphere.center.z + distance);
    this.camera.updateProjectionMatrix();
    this.controls.target.copy(sphere.center);
    this.controls.minDistance = radius * 0.3;
    this.controls.maxDistance = distance * 10;
    this.controls.update();
    this.home = { position: this.camera.position.clone(), target: sphere.center.clone() };
  }

  /** Keyboard orbit for the focused viewer: arrows rotate, +/- zoom, Home resets. */
  onKey(event) {
    const step = THREE.MathUtils.degToRad(event.shiftKey ? 2 : 10);
    const offset = this.camera.position.clone().sub(this.controls.target);
    const spherical = new THREE.Spherical().setFromVector3(offset);
    switch (event.key) {
      case 'ArrowLeft': spherical.theta -= step; break;
      case 'ArrowRight': spherical.theta += step; break;
      case 'ArrowUp': spherical.phi -= step; break;
      case 'ArrowDown': spherical.phi += step; break;
      case '+': case '=': spherical.radius /= 1.15; break;
      case '-': case '_': spherical.radius *= 1.15; break;
      case 'Home': this.resetView(); event.preventDefault(); return;
      default: return;
    }
    event.preventDefault();
    spherical.phi = THREE.MathUtils.clamp(spherical.phi, 0.01, Math.PI - 0.01);
    spherical.radius = THREE.MathUtils.clamp(spherical.radius, this.controls.minDistance, this.controls.maxDistance);
    this.camera.position.copy(this.controls.target).add(new THREE.Vector3().setFromSpherical(spherical));
    this.controls.update();
    this.render();
  }

  resetView() {
    if (!this.home) return;
    this.camera.position.copy(this.home.position);
    this.controls.target.copy(this.home.target);
    this.controls.update();
    this.render();
  }

  render() {
    this.renderer.render(this.scene, this.camera);
  }
}
