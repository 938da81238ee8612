"""Landmark-guided non-rigid registration of a template mesh onto a target surface.

The template deforms through an embedded deformation graph (a few hundred nodes sampled on it, each
carrying an affine map; every vertex blends the maps of its nearest nodes, found along the mesh so
that lips and eyelids that touch in space do not share nodes). Each step is one sparse linear least
squares problem over the node maps, with the same matrix for x, y and z:

- data: every template vertex allowed to follow the data goes to its closest point on the target
  (rejected when too far, facing the other way, or on the target's open boundary);
- landmarks: template points (vertices or barycentric points) go to known target positions;
- regularisation: each node's map predicts its graph neighbours' new positions (smoothness), and
  neighbouring maps stay alike (stiffness), with weights relaxed coarse to fine;
- a small damping toward the previous solution keeps the system positive definite.

The normal equations are factored once per step (SuperLU on a few thousand unknowns). After the
graph levels, a per-vertex refinement moves vertices the rest of the way onto the surface, with
the offsets diffused over the mesh so that vertices without data follow their neighbours.

Everything is in the target's units; distance thresholds are relative to the template's size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import scipy.sparse.csgraph as csgraph
import scipy.sparse.linalg as spla
from numpy.typing import NDArray
from scipy.spatial import cKDTree

from headforge.errors import TargetNotOverlappingError
from headforge.pipeline.geometry import umeyama

Float = NDArray[np.float64]
Int = NDArray[np.int64]

# A target point pulls a template vertex only when at least this share of the data vertices lies
# near the target after the landmark alignment; below it the two do not overlap.
MIN_OVERLAP = 0.2


@dataclass(frozen=True)
class RegistrationSettings:
    """Knobs of `register`; the defaults are what the benchmarks and the pipeline stage use."""

    nodes: int = 300  # deformation-graph nodes
    skin_nodes: int = 4  # nodes blended per vertex
    # (stiffness, iterations) per level, coarse to fine; stiffness weighs the regularisation.
    levels: tuple[tuple[float, int], ...] = ((30.0, 3), (5.0, 2), (1.0, 2))
    landmark_weight: float = 200.0  # all landmarks together, in % of the data vertices' weight
    damping: float = 1e-4
    # Correspondences farther than this share of the template's bounding-box diagonal are dropped,
    # at the first level and at the last (shrinking in between).
    max_distance_start: float = 0.08
    max_distance_end: float = 0.02
    min_normal_dot: float = 0.3
    refine_iterations: int = 2
    graph_stride: int = 3  # every n-th data vertex drives the graph levels
    refine_smoothing: int = 12  # Jacobi sweeps diffusing the refinement offsets
    overlap_distance: float = 0.08  # share of the diagonal for the overlap check


@dataclass(frozen=True)
class DeformationGraph:
    """The embedded graph of a template: node positions, node edges, and the vertex blending."""

    nodes: Float  # (N, 3) node positions on the template
    edges: Int  # (E, 2) node pairs, each once
    skin_nodes: Int  # (V, K) blending nodes per vertex
    skin_weights: Float  # (V, K) blending weights, rows sum to 1
    basis: sp.csr_matrix  # (V, 4N): deformed vertices = basis @ X, X (4N, 3) the node maps
    edge_length: float  # mean node edge length (scales the stiffness term)


@dataclass(frozen=True)
class TemplateGeometry:
    """The welded template surface the registration needs, with its cached graph."""

    vertices: Float  # (V, 3)
    faces: Int  # (F, 3)
    graph: DeformationGraph
    adjacency: sp.csr_matrix  # (V, V) vertex adjacency (0/1)
    diagonal: float  # bounding-box diagonal


@dataclass(frozen=True)
class Landmarks:
    """Template points and where they must land: point k is sum_j weights[k, j] * vertex[vertices[k, j]]."""

    vertices: Int  # (K, 3) template vertex ids (a vertex landmark repeats its id)
    weights: Float  # (K, 3) barycentric weights
    targets: Float  # (K, 3) target positions


@dataclass
class RegistrationResult:
    """The registered template and how well it fits."""

    vertices: Float  # (V, 3) in the target's frame
    residual: float  # mean distance of data-driven vertices to the target (target units)
    residual_p95: float
    driven: NDArray[np.bool_]  # (V,) vertices pulled by a target point in the last step
    landmark_error: float  # mean landmark distance after the fit (target units); nan without landmarks
    alignment: tuple[float, Float, Float]  # the similarity (scale, R, t) applied before the fit
    steps: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def driven_share(self) -> float:
        return float(self.driven.mean()) if len(self.driven) else 0.0


class TargetSurface:
    """A target mesh prepared for closest-point queries (a k-d tree on its vertices, then the exact
    closest point on the triangles around the nearest vertices)."""

    def __init__(self, vertices: NDArray[np.floating], faces: NDArray[np.integer]):
        self.vertices = np.ascontiguousarray(vertices, dtype=np.float64)
        self.faces = np.ascontiguousarray(faces, dtype=np.int64)
        self.tree = cKDTree(self.vertices)
        self.normals = fast_vertex_normals(self.vertices, self.faces)
        cross = np.cross(
            self.vertices[self.faces[:, 1]] - self.vertices[self.faces[:, 0]],
            self.vertices[self.faces[:, 2]] - self.vertices[self.faces[:, 0]],
        )
        length = np.linalg.norm(cross, axis=1, keepdims=True)
        self.face_normals = np.divide(cross, length, out=np.zeros_like(cross), where=length > 0)
        self.incident = _incident_faces(self.faces, len(self.vertices))
        self.incident = self.incident[:, : max(1, int((self.incident >= 0).sum(axis=1).max()))]
        self.boundary = _boundary_vertices(self.faces, len(self.vertices))

    def tangent_projection(self, points: Float) -> tuple[Float, Float, NDArray[np.bool_]]:
        """Projection onto the tangent plane at the nearest target vertex (cheaper than `closest`),
        that vertex's normal, and whether it lies on the open boundary."""
        _, nearest = self.tree.query(points)
        normals = self.normals[nearest]
        offset = np.einsum("ij,ij->i", points - self.vertices[nearest], normals)
        return points - offset[:, None] * normals, normals, self.boundary[nearest]

    def closest(self, points: Float, neighbours: int = 1) -> tuple[Float, Float, NDArray[np.bool_]]:
        """Closest surface point, its face normal, and whether it lies on the open boundary."""
        _, nearest = self.tree.query(points, k=neighbours)
        nearest = np.asarray(nearest).reshape(len(points), -1)
        candidates = self.incident[nearest].reshape(len(points), -1)  # (P, C) face ids, -1 padding
        valid = candidates >= 0
        safe = np.where(valid, candidates, 0)
        corners = self.vertices[self.faces[safe]]  # (P, C, 3, 3)
        projected = _closest_on_triangles(
            points[:, None, :], corners[:, :, 0], corners[:, :, 1], corners[:, :, 2]
        )
        distance = np.einsum("pcd,pcd->pc", projected - points[:, None, :], projected - points[:, None, :])
        distance[~valid] = np.inf
        best = np.argmin(distance, axis=1)
        rows = np.arange(len(points))
        point = projected[rows, best]
        face = safe[rows, best]
        on_boundary = self.boundary[nearest[:, 0]]
        return point, self.face_normals[face], on_boundary


def _incident_faces(faces: Int, vertex_count: int, cap: int = 8) -> Int:
    """(V, cap) faces around each vertex, -1 padded (vertices of higher valence keep `cap`)."""
    corner_vertex = faces.reshape(-1)
    corner_face = np.repeat(np.arange(len(faces)), 3)
    order = np.argsort(corner_vertex, kind="stable")
    sorted_vertex = corner_vertex[order]
    starts = np.searchsorted(sorted_vertex, np.arange(vertex_count))
    rank = np.arange(len(sorted_vertex)) - starts[sorted_vertex]
    table = np.full((vertex_count, cap), -1, dtype=np.int64)
    keep = rank < cap
    table[sorted_vertex[keep], rank[keep]] = corner_face[order][keep]
    return table


def _boundary_vertices(faces: Int, vertex_count: int) -> NDArray[np.bool_]:
    """Vertices on an edge used by a single face."""
    first = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2]])
    second = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0]])
    low, high = np.minimum(first, second), np.maximum(first, second)
    counts = sp.csr_matrix((np.ones(len(low)), (low, high)), shape=(vertex_count, vertex_count)).tocoo()
    single = counts.data == 1
    mask = np.zeros(vertex_count, dtype=bool)
    mask[counts.row[single]] = True
    mask[counts.col[single]] = True
    return mask


def fast_vertex_normals(vertices: Float, faces: Int) -> Float:
    """Area-weighted unit vertex normals (as `geometry.vertex_normals`, summed with bincount)."""
    cross = np.cross(
        vertices[faces[:, 1]] - vertices[faces[:, 0]], vertices[faces[:, 2]] - vertices[faces[:, 0]]
    )
    corners = faces.reshape(-1)
    repeated = np.repeat(cross, 3, axis=0)
    summed = np.stack(
        [np.bincount(corners, repeated[:, axis], minlength=len(vertices)) for axis in range(3)], axis=1
    )
    length = np.linalg.norm(summed, axis=1, keepdims=True)
    return np.divide(summed, length, out=np.zeros_like(summed), where=length > 0)


def _closest_on_triangles(p: Float, a: Float, b: Float, c: Float) -> Float:
    """Closest points on triangles (a, b, c) to points p, broadcast (Ericson's region tests, vectorized)."""
    ab, ac, ap = b - a, c - a, p - a
    d1 = np.einsum("...d,...d->...", ab, ap)
    d2 = np.einsum("...d,...d->...", ac, ap)
    bp = p - b
    d3 = np.einsum("...d,...d->...", ab, bp)
    d4 = np.einsum("...d,...d->...", ac, bp)
    cp = p - c
    d5 = np.einsum("...d,...d->...", ab, cp)
    d6 = np.einsum("...d,...d->...", ac, cp)
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2
    tiny = 1e-30
    # Interior by default.
    denominator = va + vb + vc
    denominator = np.where(np.abs(denominator) < tiny, tiny, denominator)
    v = vb / denominator
    w = vc / denominator
    result = a + ab * v[..., None] + ac * w[..., None]
    # Edge regions (checked before vertex regions, which override them).
    edge_bc = (va <= 0) & ((d4 - d3) >= 0) & ((d5 - d6) >= 0)
    t_bc = (d4 - d3) / np.maximum((d4 - d3) + (d5 - d6), tiny)
    result = np.where(edge_bc[..., None], b + (c - b) * t_bc[..., None], result)
    edge_ac = (vb <= 0) & (d2 >= 0) & (d6 <= 0)
    t_ac = d2 / np.maximum(d2 - d6, tiny)
    result = np.where(edge_ac[..., None], a + ac * t_ac[..., None], result)
    edge_ab = (vc <= 0) & (d1 >= 0) & (d3 <= 0)
    t_ab = d1 / np.maximum(d1 - d3, tiny)
    result = np.where(edge_ab[..., None], a + ab * t_ab[..., None], result)
    result = np.where(((d6 >= 0) & (d5 <= d6))[..., None], c, result)
    result = np.where(((d3 >= 0) & (d4 <= d3))[..., None], b, result)
    result = np.where(((d1 <= 0) & (d2 <= 0))[..., None], a, result)
    return np.asarray(result, dtype=np.float64)


def mesh_adjacency(faces: Int, vertex_count: int) -> sp.csr_matrix:
    """Symmetric 0/1 vertex adjacency of a triangle mesh."""
    rows = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2], faces[:, 1], faces[:, 2], faces[:, 0]])
    cols = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0], faces[:, 0], faces[:, 1], faces[:, 2]])
    adjacency = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(vertex_count, vertex_count))
    adjacency.data[:] = 1.0
    return adjacency


def _farthest_points(vertices: Float, count: int, start: int = 0) -> Int:
    """`count` vertex ids spread over the vertices by farthest-point sampling."""
    chosen = np.empty(count, dtype=np.int64)
    chosen[0] = start
    distance = np.einsum("ij,ij->i", vertices - vertices[start], vertices - vertices[start])
    for index in range(1, count):
        chosen[index] = int(np.argmax(distance))
        offset = vertices - vertices[chosen[index]]
        np.minimum(distance, np.einsum("ij,ij->i", offset, offset), out=distance)
    return chosen


def build_graph(
    vertices: Float, faces: Int, settings: RegistrationSettings | None = None
) -> DeformationGraph:
    """The deformation graph of a template: farthest-point nodes, geodesic Voronoi cells for the node
    edges, and each vertex blended from its own node and that node's neighbours (nearest first)."""
    settings = settings or RegistrationSettings()
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    count = len(vertices)
    adjacency = mesh_adjacency(faces, count)
    node_count = min(settings.nodes, count)
    node_vertices = list(_farthest_points(vertices, node_count))
    # Every connected piece (eyes, teeth, a separate ear) needs a node of its own.
    pieces, labels = csgraph.connected_components(adjacency, directed=False)
    if pieces > 1:
        present = set(labels[node_vertices].tolist())
        for piece in range(pieces):
            if piece not in present:
                node_vertices.append(int(np.flatnonzero(labels == piece)[0]))
    node_ids = np.asarray(node_vertices, dtype=np.int64)
    rows, cols = adjacency.nonzero()
    lengths = np.linalg.norm(vertices[rows] - vertices[cols], axis=1)
    weighted = sp.csr_matrix((lengths, (rows, cols)), shape=(count, count))
    _, _, sources = csgraph.dijkstra(
        weighted, directed=False, indices=node_ids, min_only=True, return_predecessors=True
    )
    node_of_vertex = np.searchsorted(np.sort(node_ids), sources)
    # `sources` holds vertex ids of nodes; map them to node indices.
    lookup = np.full(count, -1, dtype=np.int64)
    lookup[node_ids] = np.arange(len(node_ids))
    node_of_vertex = lookup[sources]
    cell_a, cell_b = node_of_vertex[rows], node_of_vertex[cols]
    crossing = cell_a != cell_b
    pairs = np.unique(np.sort(np.stack([cell_a[crossing], cell_b[crossing]], axis=1), axis=1), axis=0)
    nodes = vertices[node_ids]
    neighbours = _neighbour_table(pairs, len(node_ids))
    candidates = np.concatenate([node_of_vertex[:, None], neighbours[node_of_vertex]], axis=1)
    valid = candidates >= 0
    safe = np.where(valid, candidates, 0)
    distance = np.linalg.norm(nodes[safe] - vertices[:, None, :], axis=2)
    distance[~valid] = np.inf
    order = np.argsort(distance, axis=1)
    k = settings.skin_nodes
    picked = np.take_along_axis(safe, order[:, : k + 1], axis=1)
    picked_distance = np.take_along_axis(distance, order[:, : k + 1], axis=1)
    if picked.shape[1] < k + 1:  # fewer candidates than K + 1 everywhere (tiny templates)
        pad = k + 1 - picked.shape[1]
        picked = np.pad(picked, ((0, 0), (0, pad)), mode="edge")
        picked_distance = np.pad(picked_distance, ((0, 0), (0, pad)), constant_values=np.inf)
    reach = picked_distance[:, k]
    finite_max = np.where(np.isfinite(picked_distance[:, :k]), picked_distance[:, :k], 0.0).max(axis=1)
    reach = np.where(np.isfinite(reach), reach, finite_max * 1.5 + 1e-12)
    weights = np.clip(1.0 - picked_distance[:, :k] / reach[:, None], 0.0, None) ** 2
    weights[~np.isfinite(picked_distance[:, :k])] = 0.0
    weights[:, 0] = np.maximum(weights[:, 0], 1e-6)  # the own node always counts
    weights /= weights.sum(axis=1, keepdims=True)
    skin_nodes = picked[:, :k]
    basis = _basis(vertices, nodes, skin_nodes, weights)
    edge_length = (
        float(np.linalg.norm(nodes[pairs[:, 0]] - nodes[pairs[:, 1]], axis=1).mean()) if len(pairs) else 1.0
    )
    return DeformationGraph(nodes, pairs.astype(np.int64), skin_nodes, weights, basis, edge_length)


def _neighbour_table(pairs: Int, node_count: int) -> Int:
    """(N, D) neighbour node ids per node, -1 padded."""
    both = np.concatenate([pairs, pairs[:, ::-1]])
    if len(both) == 0:
        return np.full((node_count, 1), -1, dtype=np.int64)
    order = np.lexsort((both[:, 1], both[:, 0]))
    both = both[order]
    starts = np.searchsorted(both[:, 0], np.arange(node_count))
    rank = np.arange(len(both)) - starts[both[:, 0]]
    width = int(rank.max()) + 1
    table = np.full((node_count, width), -1, dtype=np.int64)
    table[both[:, 0], rank] = both[:, 1]
    return table


def _basis(points: Float, nodes: Float, skin_nodes: Int, weights: Float) -> sp.csr_matrix:
    """(P, 4N): row p holds w_pk * [p - g_k, 1] in node k's four columns."""
    count, k = skin_nodes.shape
    local = points[:, None, :] - nodes[skin_nodes]  # (P, K, 3)
    values = np.concatenate([local, np.ones((count, k, 1))], axis=2) * weights[:, :, None]
    columns = 4 * skin_nodes[:, :, None] + np.arange(4)
    indptr = np.arange(0, count * k * 4 + 1, k * 4)
    return sp.csr_matrix((values.reshape(-1), columns.reshape(-1), indptr), shape=(count, 4 * len(nodes)))


def _regulariser(graph: DeformationGraph) -> sp.csr_matrix:
    """Rows of the smoothness (node j predicts node k's position) and stiffness (A_j = A_k) terms;
    their right-hand side is zero."""
    nodes, edges = graph.nodes, graph.edges
    blocks: list[sp.csr_matrix] = []
    node_columns = 4 * len(nodes)
    for first, second in ((edges[:, 0], edges[:, 1]), (edges[:, 1], edges[:, 0])):
        offset = nodes[second] - nodes[first]
        count = len(first)
        rows = np.repeat(np.arange(count), 5)
        cols = np.column_stack(
            [4 * first, 4 * first + 1, 4 * first + 2, 4 * first + 3, 4 * second + 3]
        ).reshape(-1)
        values = np.column_stack([offset, np.ones(count), -np.ones(count)]).reshape(-1)
        blocks.append(sp.csr_matrix((values / graph.edge_length, (rows, cols)), shape=(count, node_columns)))
    count = len(edges)
    for axis in range(3):
        rows = np.repeat(np.arange(count), 2)
        cols = np.column_stack([4 * edges[:, 0] + axis, 4 * edges[:, 1] + axis]).reshape(-1)
        values = np.tile([1.0, -1.0], count)
        blocks.append(sp.csr_matrix((values, (rows, cols)), shape=(count, node_columns)))
    return sp.vstack(blocks).tocsr()


def prepare_template(
    vertices: NDArray[np.floating], faces: NDArray[np.integer], settings: RegistrationSettings | None = None
) -> TemplateGeometry:
    """The template with its deformation graph (build once per template and process)."""
    points: Float = np.asarray(vertices, dtype=np.float64)
    triangles: Int = np.asarray(faces, dtype=np.int64)
    graph = build_graph(points, triangles, settings)
    diagonal = float(np.linalg.norm(points.max(0) - points.min(0)))
    return TemplateGeometry(points, triangles, graph, mesh_adjacency(triangles, len(points)), diagonal)


def _identity_maps(graph: DeformationGraph) -> Float:
    maps = np.zeros((len(graph.nodes), 4, 3))
    maps[:, :3, :] = np.eye(3)
    maps[:, 3, :] = graph.nodes
    return maps.reshape(-1, 3)


def landmark_points(vertices: Float, landmarks: Landmarks) -> Float:
    """Where the landmarks' template points are on `vertices`."""
    return np.einsum("kj,kjd->kd", landmarks.weights, vertices[landmarks.vertices])


def register(
    template: TemplateGeometry,
    target_vertices: NDArray[np.floating],
    target_faces: NDArray[np.integer],
    landmarks: Landmarks | None = None,
    data_mask: NDArray[np.bool_] | None = None,
    settings: RegistrationSettings | None = None,
) -> RegistrationResult:
    """Fit `template` onto the target mesh; the result is in the target's frame and units.

    With landmarks (at least 4), the target is first brought into the template's frame by the
    similarity that best maps the template's landmark points onto their targets, and the fit runs
    there (so thresholds and weights are relative to the template); without them the target must
    already be in the template's frame. `data_mask` picks the template vertices that may follow target
    points (e.g. the face region for a face-only target); the others follow the deformation smoothly.
    Raises `TargetNotOverlappingError` when, after the alignment, too few of them lie near the target.
    """
    import time

    settings = settings or RegistrationSettings()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    graph = template.graph
    count = len(template.vertices)
    mask = np.ones(count, dtype=bool) if data_mask is None else np.asarray(data_mask, dtype=bool)
    if landmarks is not None and len(landmarks.targets) >= 4:
        scale, rotation, translation = umeyama(
            landmark_points(template.vertices, landmarks), landmarks.targets
        )
    else:
        scale, rotation, translation = 1.0, np.eye(3), np.zeros(3)

    def to_template(points: NDArray[np.floating]) -> Float:
        return np.asarray((np.asarray(points, np.float64) - translation) @ rotation / scale)

    target = TargetSurface(to_template(target_vertices), target_faces)
    local_landmarks = (
        None
        if landmarks is None or len(landmarks.targets) == 0
        else Landmarks(landmarks.vertices, landmarks.weights, to_template(landmarks.targets))
    )
    solution = _identity_maps(graph)
    basis = graph.basis
    current = template.vertices.copy()
    data_ids = np.flatnonzero(mask)
    if len(data_ids) == 0:
        raise TargetNotOverlappingError("no template vertex may follow the target (empty data region)")
    probe = data_ids[:: max(1, settings.graph_stride)]
    near, _, _ = target.tangent_projection(current[probe])
    gap = np.linalg.norm(near - current[probe], axis=1)
    limit = settings.overlap_distance * template.diagonal
    overlap = float(np.mean(gap < limit))
    if overlap < MIN_OVERLAP:
        raise TargetNotOverlappingError(
            f"the target does not overlap the template after the landmark alignment: {overlap:.0%} of the "
            f"template's data vertices lie within {limit * scale:.4g} target units of it "
            f"(at least {MIN_OVERLAP:.0%} are needed)",
            details={"overlap": round(overlap, 4), "required": MIN_OVERLAP},
        )
    timings["align_ms"] = (time.perf_counter() - started) * 1000
    # Dimensionless terms: lengths are divided by the node spacing.
    spacing = graph.edge_length
    inverse_area = 1.0 / spacing**2
    regulariser = _regulariser(graph)
    regular_normal = (regulariser.T @ regulariser).tocsc()
    unknowns = regular_normal.shape[0]
    if local_landmarks is not None:
        landmark_rows = _landmark_rows(basis, local_landmarks)
        landmark_normal = (landmark_rows.T @ landmark_rows).tocsc() * inverse_area
        landmark_rhs = np.asarray(landmark_rows.T @ local_landmarks.targets) * inverse_area
        landmark_count = len(local_landmarks.targets)
    else:
        landmark_normal = sp.csc_matrix((unknowns, unknowns))
        landmark_rhs = np.zeros_like(solution)
        landmark_count = 1
    # Stiffness means the same at any density: the regulariser scales with data vertices per edge.
    data_scale = len(data_ids) / max(len(graph.edges), 1)
    landmark_weight = settings.landmark_weight * 0.01 * len(data_ids) / landmark_count
    damping_diagonal = (
        np.tile([1.0, 1.0, 1.0, inverse_area], len(graph.nodes)) * settings.damping * data_scale
    )
    damping = sp.diags(damping_diagonal, format="csc")
    total_steps = sum(iterations for _, iterations in settings.levels)
    step = 0
    # The graph has a few hundred nodes: a share of the data vertices determines it as well as all
    # of them would, at a fraction of the closest-point queries (the refinement uses every vertex).
    graph_ids = data_ids[:: max(1, settings.graph_stride)]
    rows = basis[graph_ids]
    row_normal = (rows.T @ rows).tocsc() * (inverse_area * len(data_ids) / len(graph_ids))
    for stiffness, iterations in settings.levels:
        # One factorisation per level: rejected correspondences keep their weight but ask the vertex
        # to stay where it is, so the matrix does not change within a level.
        system = (
            row_normal
            + (stiffness * data_scale) * regular_normal
            + landmark_weight * landmark_normal
            + damping
        )
        factor = spla.splu(system.tocsc(), permc_spec="COLAMD")
        normals = None  # once per level
        for _ in range(iterations):
            fraction = step / max(total_steps - 1, 1)
            reach = template.diagonal * (
                settings.max_distance_start * (1 - fraction) + settings.max_distance_end * fraction
            )
            current = np.asarray(basis @ solution)
            if normals is None:
                normals = fast_vertex_normals(current, template.faces)
            points, weights = _correspondences(
                template, target, current, graph_ids, reach, settings, vertex_normals=normals
            )
            points = np.where(weights[:, None] > 0, points, current[graph_ids])
            rhs = (
                np.asarray(rows.T @ points) * (inverse_area * len(data_ids) / len(graph_ids))
                + landmark_weight * landmark_rhs
                + damping_diagonal[:, None] * solution
            )
            solution = factor.solve(rhs)
            step += 1
    timings["graph_ms"] = (time.perf_counter() - started) * 1000 - timings["align_ms"]
    current = np.asarray(basis @ solution)
    final_reach = template.diagonal * settings.max_distance_end
    current = _refine(template, target, current, data_ids, final_reach, settings)
    points, weights = _correspondences(template, target, current, data_ids, final_reach, settings)
    used = weights > 0
    driven = np.zeros(count, dtype=bool)
    driven[data_ids[used]] = True
    distances = np.linalg.norm(points[used] - current[data_ids[used]], axis=1) * scale
    residual = float(distances.mean()) if len(distances) else float("nan")
    p95 = float(np.percentile(distances, 95)) if len(distances) else float("nan")
    landmark_error = (
        float(
            np.linalg.norm(landmark_points(current, local_landmarks) - local_landmarks.targets, axis=1).mean()
        )
        * scale
        if local_landmarks is not None
        else float("nan")
    )
    result_vertices = scale * current @ rotation.T + translation
    timings["total_ms"] = (time.perf_counter() - started) * 1000
    return RegistrationResult(
        result_vertices, residual, p95, driven, landmark_error, (scale, rotation, translation), step, timings
    )


def _landmark_rows(basis: sp.csr_matrix, landmarks: Landmarks) -> sp.csr_matrix:
    count = len(landmarks.targets)
    rows = np.repeat(np.arange(count), 3)
    mix = sp.csr_matrix(
        (landmarks.weights.reshape(-1), (rows, landmarks.vertices.reshape(-1))), shape=(count, basis.shape[0])
    )
    return (mix @ basis).tocsr()


def _correspondences(
    template: TemplateGeometry,
    target: TargetSurface,
    current: Float,
    data_ids: Int,
    reach: float,
    settings: RegistrationSettings,
    exact: bool = False,
    vertex_normals: Float | None = None,
) -> tuple[Float, Float]:
    """Closest target points for the data vertices and their weights (0 = rejected); `exact=False`
    projects onto the tangent plane at the nearest target vertex instead of the triangles.
    `vertex_normals` of the current template may come from an earlier step (they change slowly)."""
    if vertex_normals is None:
        vertex_normals = fast_vertex_normals(current, template.faces)
    normals = vertex_normals[data_ids]
    if exact:
        points, target_normals, on_boundary = target.closest(current[data_ids])
    else:
        points, target_normals, on_boundary = target.tangent_projection(current[data_ids])
    gap = np.linalg.norm(points - current[data_ids], axis=1)
    facing = np.einsum("ij,ij->i", normals, target_normals)
    keep = (gap < reach) & (facing > settings.min_normal_dot) & ~on_boundary
    return points, keep.astype(np.float64)


def _refine(
    template: TemplateGeometry,
    target: TargetSurface,
    current: Float,
    data_ids: Int,
    reach: float,
    settings: RegistrationSettings,
) -> Float:
    """Per-vertex offsets onto the surface, diffused over the mesh (vertices without a target point
    take their neighbours' offsets)."""
    adjacency = template.adjacency
    degree = np.asarray(adjacency.sum(axis=1)).reshape(-1)
    smoothing = 0.1
    for _ in range(settings.refine_iterations):
        points, weights = _correspondences(template, target, current, data_ids, reach, settings)
        wanted = np.zeros_like(current)
        weight = np.zeros(len(current))
        wanted[data_ids] = (points - current[data_ids]) * weights[:, None]
        weight[data_ids] = weights
        offset = wanted.copy()
        for _ in range(settings.refine_smoothing):
            offset = (wanted + smoothing * np.asarray(adjacency @ offset)) / (
                weight + smoothing * degree + 1e-12
            )[:, None]
        current = current + offset
    return current
