// The 3D viewer: one three.js canvas showing either a head's textured GLB or its Gaussian splats.
// It renders on demand (after loads, orbiting and resizes) rather than in a loop, which keeps an idle
// tab cheap and makes the drawing buffer stable for anyone reading it back.

import * as THREE from 'three';
import { GLTFLoader } from 'three/examples/jsm/loaders/GLTFLoader.js';
import { OrbitControls } from 'three/examples/jsm/controls/OrbitControls.js';
import { SplatMesh, parseSplatPly } from './splats.js';

export const BACKGROUND = 0x1e2430;

export class HeadViewer {
  /**
   * @param {HTMLElement} container
   * @param {(text: string) => void} onStatus
   */
  constructor(container, onStatus) {
    this.container = container;
    this.onStatus = onStatus;
    this.mode = 'mesh';
    this.objects = { mesh: null, splats: null };
    this.loadToken = 0;

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
    for (const key of ['mesh', 'splats']) {
      const obj = this.objects[key];
      if (!obj) continue;
      this.scene.remove(obj);
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
   * Show one head. Both artifacts load in the background; the current mode shows as soon as it is ready.
   * @param {{mesh: string | null, splats: string | null}} urls
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
    await Promise.allSettled(jobs);
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
      const data = parseSplatPly(bytes);
      if (token !== this.loadToken) return;
      const splats = new SplatMesh(data);
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
      const count = this.mode === 'splats' ? `${this.objects.splats.data.count.toLocaleString()} splats. ` : '';
      this.onStatus(`${count}Drag to orbit, scroll or pinch to zoom.`);
    }
    this.render();
    // data-state tells scripts (and tests) that the current mode has been drawn.
    this.canvas.dataset.state = s ?? 'empty';
  }

  /** Point the camera at whatever is loaded, from the front (+Z), at a distance that fits it. */
  frame() {
    const box = new THREE.Box3();
    for (const obj of [this.objects.mesh, this.objects.splats]) {
      if (!obj) continue;
      if (obj instanceof SplatMesh) box.union(obj.geometry.boundingBox);
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
    const splats = this.objects.splats;
    if (splats && splats.visible) {
      const size = this.renderer.getDrawingBufferSize(new THREE.Vector2());
      splats.setViewport(size.x, size.y);
      this.camera.updateMatrixWorld();
      splats.sort(this.camera);
    }
    this.renderer.render(this.scene, this.camera);
  }
}
