package logic

import (
	"cmp"
	"context"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"imcloud/proto/pb"
)

// Limits of the presence routes.
const (
	// MaxPresenceMembers bounds the members GET /im/presence/room
	// returns; past it the reply says truncated. Each node returns at
	// most as many (cloud.MaxPresence), so a merge holds at most nodes ×
	// 1,000 members before it is cut.
	MaxPresenceMembers = 1000
	// presenceTimeout bounds the fan-out to the cloud nodes: a node that
	// does not answer in time is counted in nodes_failed.
	presenceTimeout = 2 * time.Second
	// MaxOnlineMids bounds the users one GET /im/online/mids asks about
	// (one registry read of that many users).
	MaxOnlineMids = 1000
)

type presenceMember struct {
	Mid int64  `json:"mid"`
	Key string `json:"key"`
}

// presenceReply is the data of GET /im/presence/room.
type presenceReply struct {
	Room    string           `json:"room"`
	Members []presenceMember `json:"members"`
	// Truncated: the room has more members than were returned.
	Truncated bool `json:"truncated"`
	// Nodes were asked (those the registry lists in the room);
	// NodesFailed did not answer within the timeout, and their members
	// are missing.
	Nodes       int `json:"nodes"`
	NodesFailed int `json:"nodes_failed"`
}

// presenceRoom answers GET /im/presence/room?type=live&room=1000: the
// mids and keys in a room, cluster-wide, asked of every live node the
// registry lists in the room.
func (st *Stage) presenceRoom(a api) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p, err := getParams(r)
		if err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		typ, err := p.requiredString("type")
		if err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		id, err := p.requiredString("room")
		if err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		if err := checkRoom("room", typ, id); err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		room := RoomKey(typ, id)
		nodes, err := st.pusher.registry.Nodes(r.Context())
		if err != nil {
			st.logFailure(r.Context(), "read cloud nodes", "route", r.URL.Path, "err", err)
			w.Header().Set("Retry-After", "1")
			writeError(w, http.StatusServiceUnavailable, "registry unavailable, retry later")
			return
		}
		out := st.askPresence(r.Context(), room, nodes)
		if out.Nodes > 0 && out.NodesFailed == out.Nodes {
			w.Header().Set("Retry-After", "1")
			writeError(w, http.StatusServiceUnavailable, "cloud nodes unavailable, retry later")
			return
		}
		writeJSON(w, http.StatusOK, reply{Code: 0, Message: a.okMessage(), Data: out})
	})
}

// askPresence fans out to the nodes hosting room, in parallel, and merges
// their members (sorted by mid, then key; a key listed by two nodes
// during a move is listed once).
func (st *Stage) askPresence(ctx context.Context, room string, nodes []*pb.NodeInfo) presenceReply {
	out := presenceReply{Room: room, Members: []presenceMember{}}
	ctx, cancel := context.WithTimeout(ctx, presenceTimeout)
	defer cancel()
	var (
		mu      sync.Mutex
		wg      sync.WaitGroup
		members = map[string]int64{}
	)
	for _, n := range nodes {
		if n.RoomCount[room] <= 0 {
			continue
		}
		out.Nodes++
		wg.Add(1)
		go func() {
			defer wg.Done()
			rep, err := st.presenceOf(ctx, n, room)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				out.NodesFailed++
				st.logFailure(ctx, "ask a cloud node for presence", "node", n.Id, "room", room, "err", err)
				return
			}
			out.Truncated = out.Truncated || rep.Truncated
			for _, m := range rep.Members {
				members[m.Key] = m.Mid
			}
		}()
	}
	wg.Wait()
	for k, m := range members {
		out.Members = append(out.Members, presenceMember{Mid: m, Key: k})
	}
	slices.SortFunc(out.Members, func(a, b presenceMember) int {
		return cmp.Or(cmp.Compare(a.Mid, b.Mid), strings.Compare(a.Key, b.Key))
	})
	if len(out.Members) > MaxPresenceMembers {
		out.Members, out.Truncated = out.Members[:MaxPresenceMembers], true
	}
	return out
}

func (st *Stage) presenceOf(ctx context.Context, n *pb.NodeInfo, room string) (*pb.PresenceReply, error) {
	if st.presence != nil {
		return st.presence(ctx, n, room)
	}
	c, err := st.grpc.replacer.clouds.Client(n.GrpcAddr)
	if err != nil {
		return nil, err
	}
	return c.Presence(ctx, &pb.PresenceReq{Room: room, Limit: MaxPresenceMembers})
}

// onlineReply is the data of GET /im/online/mids.
type onlineReply struct {
	Online  []int64 `json:"online"`
	Offline []int64 `json:"offline"`
}

// onlineMids answers GET /im/online/mids?mids=1,2,3 (or mids=1&mids=2):
// which users have a connection on a live node.
func (st *Stage) onlineMids(a api) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p, err := getParams(r)
		if err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		mids, err := midList(p)
		if err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		byMid, err := st.pusher.registry.KeysByMids(r.Context(), mids)
		if err == nil {
			servers := map[string]string{}
			for _, keys := range byMid {
				for k, s := range keys {
					servers[k] = s
				}
			}
			if err = st.pusher.dropLapsed(r.Context(), servers); err == nil {
				out := onlineReply{Online: []int64{}, Offline: []int64{}}
				for _, m := range mids {
					online := false
					for k := range byMid[m] {
						if _, online = servers[k]; online {
							break
						}
					}
					if online {
						out.Online = append(out.Online, m)
					} else {
						out.Offline = append(out.Offline, m)
					}
				}
				writeJSON(w, http.StatusOK, reply{Code: 0, Message: a.okMessage(), Data: out})
				return
			}
		}
		st.logFailure(r.Context(), "read sessions", "route", r.URL.Path, "err", err)
		w.Header().Set("Retry-After", "1")
		writeError(w, http.StatusServiceUnavailable, "registry unavailable, retry later")
	})
}

// midList reads mids: repeated, comma-separated or both; each at least
// 1, listed once in the answer (sorted), at most MaxOnlineMids.
func midList(p *params) ([]int64, error) {
	raw, err := p.strings("mids")
	if err != nil {
		return nil, err
	}
	seen := map[int64]bool{}
	var mids []int64
	for _, v := range raw {
		for f := range strings.SplitSeq(v, ",") {
			m, err := strconv.ParseInt(strings.TrimSpace(f), 10, 64)
			if err != nil || m < 1 {
				return nil, badParam("mids", "want integers of at least 1, got %s", echo(f))
			}
			if !seen[m] {
				if len(mids) == MaxOnlineMids {
					return nil, badParam("mids", "more than %d users", MaxOnlineMids)
				}
				seen[m] = true
				mids = append(mids, m)
			}
		}
	}
	if len(mids) == 0 {
		return nil, badParam("mids", "required")
	}
	slices.Sort(mids)
	return mids, nil
}
