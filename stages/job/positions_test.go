package job

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"

	"imcloud/pipeline"
	"imcloud/proto/pb"
)

// posCloud records the positions each room proto reaches it with.
type posCloud struct {
	pb.UnimplementedCloudServer
	mu  sync.Mutex
	got map[string]string // body -> its positions
}

func (c *posCloud) BroadcastRoom(_ context.Context, req *pb.BroadcastRoomReq) (*pb.BroadcastRoomReply, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, p := range append([]*pb.Proto{req.Proto}, req.Batch...) {
		if p != nil {
			c.got[string(p.Body)] = streamsOf(p.Positions)
		}
	}
	return &pb.BroadcastRoomReply{}, nil
}

func (c *posCloud) Broadcast(_ context.Context, req *pb.BroadcastReq) (*pb.BroadcastReply, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.got[string(req.Proto.Body)] = streamsOf(req.Proto.Positions)
	return &pb.BroadcastReply{}, nil
}

func (c *posCloud) positions() map[string]string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[string]string, len(c.got))
	for k, v := range c.got {
		out[k] = v
	}
	return out
}

func streamsOf(ps []*pb.StreamPos) string {
	var s []string
	for _, sp := range ps {
		s = append(s, fmt.Sprintf("%s@%s/%d", sp.Stream, sp.Epoch, sp.Pos))
	}
	return strings.Join(s, " ")
}

func startPosCloud(t *testing.T) (*posCloud, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &posCloud{got: map[string]string{}}
	srv := grpc.NewServer()
	pb.RegisterCloudServer(srv, c)
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(srv.Stop)
	return c, ln.Addr().String()
}

// TestRoomProtosCarryTheirPositions: a room push reaches the cloud node
// with its position in the room's stream, alone or in a batch where each
// proto carries its own; a broadcast carries none.
func TestRoomProtosCarryTheirPositions(t *testing.T) {
	for _, tt := range []struct {
		name   string
		window time.Duration
		size   int
	}{{"alone", 0, 1}, {"batched", time.Minute, 3}} {
		t.Run(tt.name, func(t *testing.T) {
			cloud, addr := startPosCloud(t)
			s := New(Options{Nodes: StaticNodes{addr}, Logger: slog.New(slog.DiscardHandler), BatchWindow: tt.window, BatchSize: tt.size, Timeout: 5 * time.Second})
			t.Cleanup(func() { _ = s.Close() })
			var wg sync.WaitGroup
			for i := 1; i <= 3; i++ {
				pm := &pb.PushMsg{Type: pb.PushMsg_ROOM, Operation: 1000, Room: "live://1", Msg: fmt.Appendf(nil, "m%d", i),
					Positions: []*pb.StreamPos{{Stream: "room:live://1", Epoch: "e1", Pos: uint64(i)}}}
				handleOne(t, &wg, s, fmt.Sprint("id", i), pm)
			}
			handleOne(t, &wg, s, "all", &pb.PushMsg{Type: pb.PushMsg_BROADCAST, Operation: 1000, Msg: []byte("everyone")})
			wg.Wait()
			want := map[string]string{"m1": "room:live://1@e1/1", "m2": "room:live://1@e1/2", "m3": "room:live://1@e1/3", "everyone": ""}
			if got := cloud.positions(); fmt.Sprint(got) != fmt.Sprint(want) {
				t.Fatalf("cloud got positions %v, want %v", got, want)
			}
		})
	}
}

func handleOne(t *testing.T, wg *sync.WaitGroup, s *Stage, id string, pm *pb.PushMsg) {
	t.Helper()
	msg, err := pipeline.NewPushMessage(id, "c", pm)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	msg.SetContext(ctx)
	wg.Go(func() {
		defer cancel()
		if err := s.Handle(msg); err != nil {
			t.Error(err)
		}
	})
}

// TestKeyPushCarriesItsUsersPositions: a key push reaches each node with
// the positions logic gave that node's message; when job moves a mid
// push's keys to other nodes, each node gets only its keys' users'.
func TestKeyPushCarriesItsUsersPositions(t *testing.T) {
	c1, addr1 := startKeyCloud(t, "tablet")
	c2, addr2 := startKeyCloud(t)
	reg := &registry{
		nodes: reportedNodes{{Id: "c1", GrpcAddr: addr1}, {Id: "c2", GrpcAddr: addr2}},
		keys:  map[string]string{"laptop": "c1", "tablet": "c1"},
		mids:  map[string]int64{"laptop": 7, "tablet": 8},
	}
	p := runJob(t, reg, time.Minute)
	positions := []*pb.StreamPos{{Stream: "user:7", Epoch: "e7", Pos: 3}, {Stream: "user:8", Epoch: "e8", Pos: 9}}
	byMid := map[int64]map[string]string{7: {"laptop": "c1"}, 8: {"tablet": "c1"}}
	// c1's share of a push to users 7 and 8; user 7's laptop left c1 and
	// came back as a new connection on c2.
	done := p.pushPositioned("m1/c1", "c1", "hello", byMid, positions, "laptop", "tablet")
	waitFor(t, "job to find the laptop offline", func() bool { return c1.callCount() >= 1 })
	c2.setOnline("laptop-2", true)
	reg.reconnect(7, "laptop", "laptop-2", "c2", false)
	p.acked(done)
	p.noPoison()
	if got := c1.positionsOf("tablet"); !slices.Equal(got, []string{"user:7@e7/3 user:8@e8/9"}) {
		t.Fatalf("c1 delivered to the tablet with positions %q, want both users' (logic's share for c1)", got)
	}
	if got := c2.positionsOf("laptop-2"); !slices.Equal(got, []string{"user:7@e7/3"}) {
		t.Fatalf("c2 delivered to the laptop's new connection with positions %q, want user 7's only", got)
	}
}

// positionsOf lists the positions each delivery to key carried.
func (c *keyCloud) positionsOf(key string) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.streams[key])
}
