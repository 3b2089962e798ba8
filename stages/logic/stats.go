package logic

import (
	"cmp"
	"net/http"
	"slices"
	"strconv"
	"strings"

	"imcloud/proto/pb"
)

// statsRoute answers a GET from the registry's view of the cloud nodes.
type statsRoute func(r *http.Request, nodes []*pb.NodeInfo) (any, error)

func (st *Stage) stats(route statsRoute) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !st.authorized(r) {
			writeError(w, http.StatusUnauthorized, "missing or wrong API key (Authorization: Bearer <key>)")
			return
		}
		nodes, err := st.pusher.registry.Nodes(r.Context())
		if err != nil {
			st.logger.ErrorContext(r.Context(), "read cloud nodes", "err", err)
			w.Header().Set("Retry-After", "1")
			writeError(w, http.StatusServiceUnavailable, "registry unavailable, retry later")
			return
		}
		data, err := route(r, nodes)
		if err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		writeJSON(w, http.StatusOK, reply{Code: 0, Message: "ok", Data: data})
	})
}

// roomCounts sums every node's room counts.
func roomCounts(nodes []*pb.NodeInfo) map[string]int32 {
	all := map[string]int32{}
	for _, n := range nodes {
		for room, c := range n.RoomCount {
			all[room] += c
		}
	}
	return all
}

type roomCount struct {
	RoomID string `json:"room_id"`
	Count  int32  `json:"count"`
}

// onlineTop lists the busiest rooms of a type: GET /im/online/top?type=live&limit=10.
func onlineTop(r *http.Request, nodes []*pb.NodeInfo) (any, error) {
	q := r.URL.Query()
	typ := q.Get("type")
	if typ == "" {
		return nil, badParam("type", "required")
	}
	limit := 10
	if s := q.Get("limit"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > 1000 {
			return nil, badParam("limit", "want an integer from 1 to 1000, got %q", s)
		}
		limit = n
	}
	prefix := typ + "://"
	top := []roomCount{}
	for room, c := range roomCounts(nodes) {
		if id, ok := strings.CutPrefix(room, prefix); ok && c > 0 {
			top = append(top, roomCount{RoomID: id, Count: c})
		}
	}
	slices.SortFunc(top, func(a, b roomCount) int {
		return cmp.Or(cmp.Compare(b.Count, a.Count), strings.Compare(a.RoomID, b.RoomID))
	})
	return top[:min(limit, len(top))], nil
}

// onlineRoom counts the given rooms: GET /im/online/room?type=live&rooms=1&rooms=2.
func onlineRoom(r *http.Request, nodes []*pb.NodeInfo) (any, error) {
	q := r.URL.Query()
	typ := q.Get("type")
	if typ == "" {
		return nil, badParam("type", "required")
	}
	rooms := q["rooms"]
	if len(rooms) == 0 {
		return nil, badParam("rooms", "required")
	}
	all := roomCounts(nodes)
	out := make(map[string]int32, len(rooms))
	for _, id := range rooms {
		out[id] = all[RoomKey(typ, id)]
	}
	return out, nil
}

// onlineTotal counts connections and distinct client IPs per node, summed:
// GET /im/online/total.
func onlineTotal(_ *http.Request, nodes []*pb.NodeInfo) (any, error) {
	var conns, ips int64
	for _, n := range nodes {
		conns += int64(n.ConnCount)
		ips += int64(n.IpCount)
	}
	return map[string]int64{"conn_count": conns, "ip_count": ips}, nil
}

type weightedNode struct {
	Host    string `json:"host"`
	TCPPort int32  `json:"tcp_port,omitempty"`
	WSPort  int32  `json:"ws_port,omitempty"`
	WSSPort int32  `json:"wss_port,omitempty"`
	Weight  int32  `json:"weight"`
}

// nodesWeighted lists where a client should connect, best first: nodes
// with the fewest connections for their weight lead. GET /im/nodes/weighted.
func (st *Stage) nodesWeighted(r *http.Request, nodes []*pb.NodeInfo) (any, error) {
	ordered := slices.Clone(nodes)
	load := func(n *pb.NodeInfo) float64 { return float64(n.ConnCount) / float64(max(n.Weight, 1)) }
	slices.SortStableFunc(ordered, func(a, b *pb.NodeInfo) int { return cmp.Compare(load(a), load(b)) })
	out := make([]weightedNode, 0, len(ordered))
	for _, n := range ordered {
		if n.Host == "" {
			continue
		}
		out = append(out, weightedNode{Host: n.Host, TCPPort: n.TcpPort, WSPort: n.WsPort, WSSPort: n.WssPort, Weight: n.Weight})
	}
	hb := int64(st.heartbeat.Seconds())
	return map[string]any{
		"platform":      r.URL.Query().Get("platform"),
		"nodes":         out,
		"heartbeat":     hb,
		"heartbeat_max": 2,
		// Clients reconnect with exponential backoff and jitter.
		"backoff": map[string]any{"base_delay_ms": 1000, "max_delay_ms": 30000, "factor": 1.6, "jitter": 0.2},
	}, nil
}
