package logic

import (
	"cmp"
	"net/http"
	"slices"
	"strconv"
	"strings"

	"imcloud/proto/pb"
	"imcloud/proto/wire"
)

// statsRoute answers a GET from the registry's view of the cloud nodes.
// It validates its parameters first: nodes is nil then, and the route
// returns what it will compute from them.
type statsRoute func(p *params) (func(nodes []*pb.NodeInfo) any, error)

func (st *Stage) stats(a api, route statsRoute) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p, err := getParams(r)
		if err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		answer, err := route(p)
		if err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		// The node list as pushes read it (kept for a tenth of
		// cloud.renew_interval with the Redis registry): counts are as old
		// as the nodes' last report anyway, and /im/nodes/weighted, which
		// needs no key, costs the registry one read per interval however
		// often it is asked.
		nodes, err := st.pusher.nodes.Nodes(r.Context())
		if err != nil {
			st.logFailure(r.Context(), "read cloud nodes", "route", r.URL.Path, "err", err)
			w.Header().Set("Retry-After", "1")
			writeError(w, http.StatusServiceUnavailable, "registry unavailable, retry later")
			return
		}
		writeJSON(w, http.StatusOK, reply{Code: 0, Message: a.okMessage(), Data: answer(nodes)})
	})
}

// roomType reads and checks the type parameter.
func roomType(p *params) (string, error) {
	typ, err := p.requiredString("type")
	if err != nil {
		return "", err
	}
	if err := checkType(typ); err != nil {
		return "", err
	}
	return typ, nil
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
func onlineTop(p *params) (func([]*pb.NodeInfo) any, error) {
	typ, err := roomType(p)
	if err != nil {
		return nil, err
	}
	limit := int64(10)
	if p.has("limit") {
		if limit, err = p.int("limit", 32, 1, 1000); err != nil {
			return nil, err
		}
	}
	return func(nodes []*pb.NodeInfo) any {
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
		return top[:min(int(limit), len(top))]
	}, nil
}

// onlineRoom counts the given rooms: GET /im/online/room?type=live&rooms=1&rooms=2.
func onlineRoom(p *params) (func([]*pb.NodeInfo) any, error) {
	typ, err := roomType(p)
	if err != nil {
		return nil, err
	}
	rooms, _ := p.strings("rooms")
	if len(rooms) == 0 {
		return nil, badParam("rooms", "required")
	}
	for _, id := range rooms {
		if err := checkRoom("rooms", typ, id); err != nil {
			return nil, err
		}
	}
	return func(nodes []*pb.NodeInfo) any {
		all := roomCounts(nodes)
		out := make(map[string]int32, len(rooms))
		for _, id := range rooms {
			out[id] = all[RoomKey(typ, id)]
		}
		return out
	}, nil
}

// onlineTotal counts connections and distinct client IPs per node, summed:
// GET /im/online/total.
func onlineTotal(*params) (func([]*pb.NodeInfo) any, error) {
	return func(nodes []*pb.NodeInfo) any {
		var conns, ips int64
		for _, n := range nodes {
			conns += int64(n.ConnCount)
			ips += int64(n.IpCount)
		}
		return map[string]int64{"conn_count": conns, "ip_count": ips}
	}, nil
}

// platform reads and checks the platform parameter.
func platform(p *params) (string, error) {
	s, err := p.string("platform")
	if err != nil {
		return "", err
	}
	if err := wire.ValidPlatform(s); err != nil {
		return "", wireError("platform", err)
	}
	return s, nil
}

type weightedNode struct {
	Host    string `json:"host"`
	TCPPort int32  `json:"tcp_port,omitempty"`
	WSPort  int32  `json:"ws_port,omitempty"`
	WSSPort int32  `json:"wss_port,omitempty"`
	Weight  int32  `json:"weight"`
}

// byLoad returns the nodes clients can reach, the fewest connections for
// their weight first.
func byLoad(nodes []*pb.NodeInfo) []*pb.NodeInfo {
	ordered := slices.DeleteFunc(slices.Clone(nodes), func(n *pb.NodeInfo) bool { return n.Host == "" })
	load := func(n *pb.NodeInfo) float64 { return float64(n.ConnCount) / float64(max(n.Weight, 1)) }
	slices.SortStableFunc(ordered, func(a, b *pb.NodeInfo) int { return cmp.Compare(load(a), load(b)) })
	return ordered
}

// nodesWeighted lists where a client should connect, best first: nodes
// with the fewest connections for their weight lead. GET /im/nodes/weighted.
func (st *Stage) nodesWeighted(p *params) (func([]*pb.NodeInfo) any, error) {
	plat, err := platform(p)
	if err != nil {
		return nil, err
	}
	return func(nodes []*pb.NodeInfo) any {
		ordered := byLoad(nodes)
		out := make([]weightedNode, 0, len(ordered))
		for _, n := range ordered {
			out = append(out, weightedNode{Host: n.Host, TCPPort: n.TcpPort, WSPort: n.WsPort, WSSPort: n.WssPort, Weight: n.Weight})
		}
		return map[string]any{
			"platform":      plat,
			"nodes":         out,
			"heartbeat":     int64(st.heartbeat.Seconds()),
			"heartbeat_max": heartbeatMax,
			// Clients reconnect with exponential backoff and jitter.
			"backoff": map[string]any{"base_delay_ms": 1000, "max_delay_ms": 30000, "factor": 1.6, "jitter": 0.2},
		}
	}, nil
}

// heartbeatMax is how many heartbeat intervals a client may miss before
// its connection is closed.
const heartbeatMax = 2

// goimMaxNodes is how many nodes goim's nodes/weighted lists.
const goimMaxNodes = 5

// goimNodes is goim's NodesReply, as goim's logic serves it on
// /goim/nodes/weighted: one set of ports for every listed node, delays
// in seconds.
type goimNodes struct {
	Domain       string       `json:"domain,omitempty"`
	TCPPort      int32        `json:"tcp_port,omitempty"`
	WSPort       int32        `json:"ws_port,omitempty"`
	WSSPort      int32        `json:"wss_port,omitempty"`
	Heartbeat    int32        `json:"heartbeat,omitempty"`
	Nodes        []string     `json:"nodes,omitempty"`
	Backoff      *goimBackoff `json:"backoff,omitempty"`
	HeartbeatMax int32        `json:"heartbeat_max,omitempty"`
}

type goimBackoff struct {
	MaxDelay  int32   `json:"max_delay,omitempty"`
	BaseDelay int32   `json:"base_delay,omitempty"`
	Factor    float32 `json:"factor,omitempty"`
	Jitter    float32 `json:"jitter,omitempty"`
}

// goimNodesWeighted answers GET /goim/nodes/weighted?platform= in goim's
// shape. goim's reply has one set of ports for all its nodes, so it lists
// the least loaded node and those that share its ports (at most five, as
// goim does); the domain is the least loaded node's host.
func (st *Stage) goimNodesWeighted(p *params) (func([]*pb.NodeInfo) any, error) {
	if _, err := platform(p); err != nil {
		return nil, err
	}
	return func(nodes []*pb.NodeInfo) any {
		reply := goimNodes{
			Heartbeat:    int32(st.heartbeat.Seconds()),
			HeartbeatMax: heartbeatMax,
			Backoff:      &goimBackoff{MaxDelay: 30, BaseDelay: 1, Factor: 1.6, Jitter: 0.2},
		}
		ordered := byLoad(nodes)
		if len(ordered) == 0 {
			return reply
		}
		first := ordered[0]
		reply.Domain, reply.TCPPort, reply.WSPort, reply.WSSPort = first.Host, first.TcpPort, first.WsPort, first.WssPort
		for _, n := range ordered {
			if len(reply.Nodes) == goimMaxNodes {
				break
			}
			if n.TcpPort == first.TcpPort && n.WsPort == first.WsPort && n.WssPort == first.WssPort && !slices.Contains(reply.Nodes, n.Host) {
				reply.Nodes = append(reply.Nodes, n.Host)
			}
		}
		return reply
	}, nil
}

// goimInstance is a discovery instance as goim's /goim/nodes/instances
// lists its comet nodes (bilibili/discovery's naming.Instance).
type goimInstance struct {
	Region   string            `json:"region"`
	Zone     string            `json:"zone"`
	Env      string            `json:"env"`
	AppID    string            `json:"appid"`
	Hostname string            `json:"hostname"`
	Addrs    []string          `json:"addrs"`
	Version  string            `json:"version"`
	LastTs   int64             `json:"latest_timestamp"`
	Metadata map[string]string `json:"metadata"`
}

// goimNodesInstances answers GET /goim/nodes/instances: the live cloud
// nodes as goim's comet instances, with goim's metadata keys.
func goimNodesInstances(*params) (func([]*pb.NodeInfo) any, error) {
	return func(nodes []*pb.NodeInfo) any {
		out := make([]goimInstance, 0, len(nodes))
		for _, n := range nodes {
			out = append(out, goimInstance{
				AppID: "goim.comet", Hostname: n.Id, Addrs: []string{"grpc://" + n.GrpcAddr},
				Metadata: map[string]string{
					"weight":     strconv.Itoa(int(max(n.Weight, 1))),
					"offline":    "false",
					"addrs":      n.Host,
					"ip_count":   strconv.Itoa(int(n.IpCount)),
					"conn_count": strconv.Itoa(int(n.ConnCount)),
				},
			})
		}
		return out
	}, nil
}
