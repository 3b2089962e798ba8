// Package registrytest is the contract every session registry passes:
// adapters/memory for one process, adapters/redis for a cluster.
package registrytest

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"imcloud/pipeline"
	"imcloud/proto/pb"
)

// Factory returns an empty registry whose sessions and nodes expire after
// the given TTLs without renewal.
type Factory func(t *testing.T, sessionTTL, nodeTTL time.Duration) pipeline.Registry

// Run runs the contract against registries from newRegistry.
func Run(t *testing.T, newRegistry Factory) {
	t.Run("sessions", func(t *testing.T) { sessions(t, checked{t, newRegistry(t, time.Minute, time.Minute)}) })
	t.Run("connections", func(t *testing.T) { connections(t, checked{t, newRegistry(t, time.Minute, time.Minute)}) })
	t.Run("previous connection", func(t *testing.T) { previousConn(t, checked{t, newRegistry(t, time.Minute, time.Minute)}) })
	t.Run("session expiry", func(t *testing.T) { sessionExpiry(t, checked{t, newRegistry(t, time.Second, time.Minute)}) })
	t.Run("nodes", func(t *testing.T) { nodes(t, checked{t, newRegistry(t, time.Minute, time.Second)}) })
	t.Run("users of keys", func(t *testing.T) { usersOfKeys(t, checked{t, newRegistry(t, time.Minute, time.Minute)}) })
}

// checked wraps r so that every call fails the test on an error.
type checked struct {
	t *testing.T
	r pipeline.Registry
}

func (c checked) fatal(err error) {
	c.t.Helper()
	if err != nil {
		c.t.Fatal(err)
	}
}

func (c checked) add(mid int64, key, server string) string {
	c.t.Helper()
	return c.addConn(mid, key, server, 0)
}

func (c checked) addConn(mid int64, key, server string, conn uint64) string {
	c.t.Helper()
	prev, _ := c.addPrev(mid, key, server, conn)
	return prev
}

// addPrev adds a session and returns the previous server and connection.
func (c checked) addPrev(mid int64, key, server string, conn uint64) (string, uint64) {
	c.t.Helper()
	prev, prevConn, err := c.r.AddSession(context.Background(), mid, key, server, conn)
	c.fatal(err)
	return prev, prevConn
}

func (c checked) renew(mid int64, key, server string) {
	c.t.Helper()
	c.renewConn(mid, key, server, 0)
}

func (c checked) renewConn(mid int64, key, server string, conn uint64) {
	c.t.Helper()
	c.fatal(c.r.RenewSession(context.Background(), mid, key, server, conn))
}

func (c checked) del(mid int64, key, server string) bool {
	c.t.Helper()
	return c.delConn(mid, key, server, 0)
}

func (c checked) delConn(mid int64, key, server string, conn uint64) bool {
	c.t.Helper()
	had, err := c.r.DelSession(context.Background(), mid, key, server, conn)
	c.fatal(err)
	return had
}

// servers returns ServersByKeys, checking that SessionsByKeys names the
// same keys on the same servers.
func (c checked) servers(keys ...string) map[string]string {
	c.t.Helper()
	s, err := c.r.ServersByKeys(context.Background(), keys)
	c.fatal(err)
	sessions := c.sessionsOf(keys...)
	if len(sessions) != len(s) {
		c.t.Fatalf("SessionsByKeys(%q) = %v, ServersByKeys = %v: not the same keys", keys, sessions, s)
	}
	for k, sess := range sessions {
		if s[k] != sess.Server {
			c.t.Fatalf("SessionsByKeys(%q)[%s] is on %q, ServersByKeys says %q", keys, k, sess.Server, s[k])
		}
	}
	return s
}

func (c checked) sessionsOf(keys ...string) map[string]pipeline.Session {
	c.t.Helper()
	s, err := c.r.SessionsByKeys(context.Background(), keys)
	c.fatal(err)
	return s
}

// mids returns the live keys of the users, merged, and the users with none.
func (c checked) mids(mids ...int64) (map[string]string, []int64) {
	c.t.Helper()
	byMid, err := c.r.KeysByMids(context.Background(), mids)
	c.fatal(err)
	keys := map[string]string{}
	var offline []int64
	for _, m := range mids {
		if len(byMid[m]) == 0 {
			offline = append(offline, m)
		}
		maps.Copy(keys, byMid[m])
	}
	return keys, offline
}

func (c checked) renewNode(n *pb.NodeInfo) map[string]int32 {
	c.t.Helper()
	all, err := c.r.RenewNode(context.Background(), n)
	c.fatal(err)
	return all
}

func (c checked) nodes() []*pb.NodeInfo {
	c.t.Helper()
	ns, err := c.r.Nodes(context.Background())
	c.fatal(err)
	return ns
}

func sessions(t *testing.T, r checked) {
	r.add(1, "a", "n1")
	r.add(1, "b", "n2")
	r.add(2, "c", "n1")
	if prev := r.add(2, "c", "n2"); prev != "n1" {
		t.Fatalf("moving key c returned previous server %q, want n1", prev)
	}
	if prev := r.add(2, "c", "n2"); prev != "" {
		t.Fatalf("reconnecting c on the same server returned %q, want none", prev)
	}
	if got, want := r.servers("a", "c", "zz"), map[string]string{"a": "n1", "c": "n2"}; !maps.Equal(got, want) {
		t.Fatalf("ServersByKeys = %v, want %v", got, want)
	}
	keys, offline := r.mids(1, 3)
	if want := map[string]string{"a": "n1", "b": "n2"}; !maps.Equal(keys, want) || !slices.Equal(offline, []int64{3}) {
		t.Fatalf("KeysByMids = %v offline %v", keys, offline)
	}
	// A disconnect reported by a server that no longer holds the key is ignored.
	if had := r.del(2, "c", "n1"); had {
		t.Fatal("stale disconnect deleted the moved session")
	}
	if had := r.del(2, "c", "n2"); !had {
		t.Fatal("disconnect did not delete the session")
	}
	if _, offline := r.mids(2); !slices.Equal(offline, []int64{2}) {
		t.Fatalf("mid 2 still online after its only key left: offline %v", offline)
	}
	// A key that changes user leaves the old user's keys.
	r.add(5, "b", "n2")
	if keys, _ := r.mids(1); !maps.Equal(keys, map[string]string{"a": "n1"}) {
		t.Fatalf("mid 1 keys after b moved to mid 5: %v", keys)
	}
}

// connections: a key's session belongs to one connection. Connection 1 of
// key k closing while connection 2 of the same key registers on the same
// server (the reconnect race: 2's Connect lands before 1's Disconnect)
// must leave 2 registered, and 1's late heartbeat must not take the
// session back.
func connections(t *testing.T, r checked) {
	r.addConn(7, "k", "n1", 1)
	r.addConn(7, "k", "n1", 2)
	if had := r.delConn(7, "k", "n1", 1); had {
		t.Fatal("the replaced connection's disconnect deleted its successor's session")
	}
	if s := r.servers("k"); s["k"] != "n1" {
		t.Fatalf("key k offline after its replaced connection left: %v", s)
	}
	r.renewConn(7, "k", "n1", 1)
	if had := r.delConn(7, "k", "n1", 1); had {
		t.Fatal("the replaced connection's heartbeat took the session back")
	}
	if had := r.delConn(7, "k", "n1", 2); !had {
		t.Fatal("the live connection's disconnect did not delete its session")
	}
	if s := r.servers("k"); len(s) != 0 {
		t.Fatalf("key k online after its connection left: %v", s)
	}
	// A heartbeat of a session that expired (or was never seen) re-creates it.
	r.renewConn(7, "k", "n1", 3)
	if had := r.delConn(7, "k", "n1", 3); !had {
		t.Fatal("heartbeat did not re-create the missing session")
	}
	// conn 0 comes from an older cloud node that does not name its
	// connections: its disconnect matches by server, as before.
	r.addConn(8, "old", "n1", 0)
	if had := r.delConn(8, "old", "n1", 0); !had {
		t.Fatal("disconnect without a connection id did not delete the session")
	}
	r.addConn(8, "old", "n1", 4)
	if had := r.delConn(8, "old", "n2", 4); had {
		t.Fatal("disconnect from another server deleted the session")
	}
	if had := r.delConn(8, "old", "n1", 0); !had {
		t.Fatal("disconnect without a connection id did not delete a named session")
	}
	// A session stored without an id (through an older logic) is taken
	// over by its connection's heartbeat and deleted by its disconnect.
	r.addConn(9, "unnamed", "n1", 0)
	r.renewConn(9, "unnamed", "n1", 5)
	if had := r.delConn(9, "unnamed", "n1", 6); had {
		t.Fatal("the heartbeat did not name the unnamed session: another connection's disconnect deleted it")
	}
	if had := r.delConn(9, "unnamed", "n1", 5); !had {
		t.Fatal("disconnect of the connection that named the session did not delete it")
	}
	r.addConn(9, "unnamed", "n1", 0)
	if had := r.delConn(9, "unnamed", "n1", 7); !had {
		t.Fatal("a named disconnect did not delete a session stored without an id")
	}
}

// previousConn: a key moving to another server names the connection it
// leaves, so that logic closes that one and not a newer connection of the
// key on the old server (two cloud nodes, a key reconnecting on both).
func previousConn(t *testing.T, r checked) {
	type step struct {
		server   string
		conn     uint64
		wantPrev string
		wantConn uint64
	}
	for _, tc := range []struct {
		name  string
		steps []step
	}{
		{"first connection", []step{{"n1", 1, "", 0}}},
		{"same server, another connection", []step{{"n1", 1, "", 0}, {"n1", 2, "", 0}}},
		{"to another server", []step{{"n1", 1, "", 0}, {"n2", 9, "n1", 1}}},
		{"back and forth", []step{{"n1", 1, "", 0}, {"n2", 9, "n1", 1}, {"n1", 2, "n2", 9}}},
		{"replaced on the old server first", []step{{"n1", 1, "", 0}, {"n1", 2, "", 0}, {"n2", 9, "n1", 2}}},
		{"from an unnamed connection", []step{{"n1", 0, "", 0}, {"n2", 9, "n1", 0}}},
		{"largest id", []step{{"n1", 1<<64 - 1, "", 0}, {"n2", 9, "n1", 1<<64 - 1}}},
	} {
		key := "prev:" + strings.ReplaceAll(tc.name, " ", "-")
		for i, s := range tc.steps {
			prev, prevConn := r.addPrev(11, key, s.server, s.conn)
			if prev != s.wantPrev || prevConn != s.wantConn {
				t.Errorf("%s: step %d (%s conn %d) returned previous %q conn %d, want %q conn %d",
					tc.name, i, s.server, s.conn, prev, prevConn, s.wantPrev, s.wantConn)
			}
		}
	}
}

// waitUntil polls cond until it holds or the deadline passes.
func waitUntil(t *testing.T, what string, within time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, within)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func sessionExpiry(t *testing.T, r checked) {
	r.add(1, "kept", "n1")
	r.add(2, "dropped", "n1")
	start := time.Now()
	// "kept" heartbeats; "dropped" does not and must be gone within its TTL.
	waitUntil(t, "session without heartbeats expires", 5*time.Second, func() bool {
		r.renew(1, "kept", "n1")
		s := r.servers("dropped")
		return len(s) == 0
	})
	if time.Since(start) < 900*time.Millisecond {
		t.Fatalf("session expired after %s, before its 1s TTL", time.Since(start))
	}
	if s := r.servers("kept"); s["kept"] != "n1" {
		t.Fatal("renewed session expired")
	}
	if _, offline := r.mids(2); !slices.Equal(offline, []int64{2}) {
		t.Fatalf("expired session still counts for its user: offline %v", offline)
	}
}

func nodes(t *testing.T, r checked) {
	n1 := &pb.NodeInfo{Id: "n1", GrpcAddr: "10.0.0.1:3109", Host: "10.0.0.1", WsPort: 3102, Weight: 1, ConnCount: 4, IpCount: 3, RoomCount: map[string]int32{"live://1": 3, "live://2": 1}}
	n2 := &pb.NodeInfo{Id: "n2", GrpcAddr: "10.0.0.2:3109", Host: "10.0.0.2", TcpPort: 3101, Weight: 2, ConnCount: 2, IpCount: 2, RoomCount: map[string]int32{"live://1": 2}}
	r.renewNode(n1)
	all := r.renewNode(n2)
	if want := map[string]int32{"live://1": 5}; !maps.Equal(all, want) {
		t.Fatalf("cluster room counts = %v, want %v", all, want)
	}
	got := r.nodes()
	if len(got) != 2 || got[0].Id != "n1" || got[1].Id != "n2" || got[1].Weight != 2 || got[0].RoomCount["live://2"] != 1 {
		t.Fatalf("Nodes = %v", got)
	}
	// n2 keeps reporting; n1 stops and lapses within its TTL.
	start := time.Now()
	waitUntil(t, "node that stopped reporting lapses", 5*time.Second, func() bool {
		r.renewNode(n2)
		return len(r.nodes()) == 1
	})
	if time.Since(start) < 900*time.Millisecond {
		t.Fatalf("node lapsed after %s, before its 1s TTL", time.Since(start))
	}
	if got := r.nodes(); got[0].Id != "n2" {
		t.Fatalf("live node is %v, want n2", got[0].Id)
	}
	if all := r.renewNode(n2); all["live://1"] != 2 {
		t.Fatalf("room counts still include the lapsed node: %v", all)
	}
}

// Prefix returns a key prefix unique to the test, for stores shared by runs.
func Prefix(t *testing.T) string {
	return fmt.Sprintf("imcloud:test:%d:", time.Now().UnixNano())
}

// usersOfKeys: SessionsByKeys gives each live key's user and server, the
// user the key has now (a key may be taken by another user).
func usersOfKeys(t *testing.T, r checked) {
	r.add(1, "a", "n1")
	r.add(1, "b", "n2")
	r.add(2, "c", "n1")
	r.add(0, "guest", "n2")
	want := map[string]pipeline.Session{"a": {Mid: 1, Server: "n1"}, "b": {Mid: 1, Server: "n2"}, "c": {Mid: 2, Server: "n1"}, "guest": {Mid: 0, Server: "n2"}}
	if got := r.sessionsOf("a", "b", "c", "guest", "offline"); !maps.Equal(got, want) {
		t.Fatalf("SessionsByKeys = %v, want %v", got, want)
	}
	// Key c reconnects as another user, on another node.
	r.add(3, "c", "n2")
	if got := r.sessionsOf("c"); got["c"] != (pipeline.Session{Mid: 3, Server: "n2"}) {
		t.Fatalf("SessionsByKeys(c) after it moved to user 3 on n2 = %v", got)
	}
	r.del(1, "a", "n1")
	if got := r.sessionsOf("a", "b"); len(got) != 1 || got["b"] != (pipeline.Session{Mid: 1, Server: "n2"}) {
		t.Fatalf("SessionsByKeys(a, b) after a left = %v, want only b", got)
	}
	if got := r.sessionsOf(); len(got) != 0 {
		t.Fatalf("SessionsByKeys() = %v, want none", got)
	}
}
