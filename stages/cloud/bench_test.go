package cloud

import (
	"bufio"
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"imcloud/pipeline/config"
	"imcloud/proto/pb"
	"imcloud/proto/wire"
)

// discardTransport is an in-memory connection that counts what is written.
type discardTransport struct {
	packets *atomic.Int64
	writes  *atomic.Int64
	bufs    *sync.Pool
}

func (d discardTransport) Read() ([]wire.Packet, error) { select {} }

func (d discardTransport) Write(batch []outItem, seq *atomic.Int32) error {
	bp := d.bufs.Get().(*[]byte)
	*bp = appendBatch((*bp)[:0], batch, seq)
	d.bufs.Put(bp)
	d.packets.Add(int64(len(batch)))
	d.writes.Add(1)
	return nil
}

func (discardTransport) Close(int, string)                  {}
func (discardTransport) SetReadDeadline(time.Time) error    { return nil }
func (discardTransport) RemoteAddr() net.Addr               { return &net.TCPAddr{} }
func (discardTransport) idleConn() (syscall.Conn, bool)     { return nil, false }
func (discardTransport) admitted(clientBudget, func() bool) {}

// BenchmarkRoomFanout pushes one message per op to a room of 10,000
// in-memory connections and waits until every connection has written it.
// Sequential: every push is its own round.
func BenchmarkRoomFanout(b *testing.B) {
	benchmarkRoomFanout(b, false, func(push func()) {
		for b.Loop() {
			push()
		}
	})
}

// BenchmarkRoomFanoutConcurrent pushes from concurrent callers, as job's
// handlers do: pushes meeting a running fan-out go out together in the
// next round, several packets per write.
func BenchmarkRoomFanoutConcurrent(b *testing.B) {
	b.SetParallelism(4)
	benchmarkRoomFanout(b, false, func(push func()) {
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				push()
			}
		})
	})
}

// BenchmarkRoomFanoutPositioned is BenchmarkRoomFanout with each push at
// the next position of the room's stream (issue 12), through the orderer.
func BenchmarkRoomFanoutPositioned(b *testing.B) {
	benchmarkRoomFanout(b, true, func(push func()) {
		for b.Loop() {
			push()
		}
	})
}

func benchmarkRoomFanout(b *testing.B, positions bool, run func(push func())) {
	const conns = 10_000
	cfg := config.Default().Cloud
	st := New(cfg, Options{Self: &pb.NodeInfo{Id: "bench"}, Logger: slog.New(slog.DiscardHandler)})
	var packets, writes atomic.Int64
	for i := range conns {
		ch := newChannel(discardTransport{&packets, &writes, st.bufs}, cfg.SendQueue, cfg.SendQueueBytes, &st.slowConsumers, st.logger)
		ch.mid, ch.key, ch.rooms = int64(i+1), fmt.Sprint("k", i), []string{"live://bench"}
		bucketFor(st.buckets, ch.key).put(ch, time.Now())
	}
	if positions {
		// The room's top, as a ConnectReply gives it.
		st.order.settle(st.order.lockStream("room:live://bench", false), &pb.StreamPos{Stream: "room:live://bench", Epoch: "e1"})
	}
	rpc := &grpcServer{s: st}
	ctx := context.Background()
	var pushes, pos atomic.Int64
	b.ReportAllocs()
	start := time.Now()
	run(func() {
		req := &pb.BroadcastRoomReq{RoomId: "live://bench", Proto: &pb.Proto{Op: 1000, Body: make([]byte, 128)}}
		if positions {
			req.Proto.Positions = []*pb.StreamPos{{Stream: "room:live://bench", Epoch: "e1", Pos: uint64(pos.Add(1))}}
		}
		if _, err := rpc.BroadcastRoom(ctx, req); err != nil {
			b.Error(err)
		}
		pushes.Add(1)
	})
	want := pushes.Load() * conns
	for packets.Load() < want {
		time.Sleep(100 * time.Microsecond)
	}
	elapsed := time.Since(start)
	b.ReportMetric(float64(want)/elapsed.Seconds(), "deliveries/s")
	b.ReportMetric(float64(packets.Load())/float64(max(writes.Load(), 1)), "packets/write")
	if slow := st.SlowConsumers(); slow > 0 {
		b.Fatalf("%d in-memory connections were closed as slow consumers", slow)
	}
}

// BenchmarkIdleConnectionMemory opens b.N idle authenticated connections
// from a separate client process and reports the server's heap and stack
// growth per connection. Run it with a fixed count: -benchtime=10000x.
func BenchmarkIdleConnectionMemory(b *testing.B) {
	for _, transport := range []string{"ws", "tcp"} {
		b.Run(transport, func(b *testing.B) {
			n := startNode(b, func(*config.Cloud) {})
			addr := n.target(transport)
			beforeHeap, beforeStack := inUse()
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s %d", clientsEnv, addr, b.N))
			stdin, err := cmd.StdinPipe()
			if err != nil {
				b.Fatal(err)
			}
			out, err := cmd.StdoutPipe()
			if err != nil {
				b.Fatal(err)
			}
			cmd.Stderr = os.Stderr
			if err := cmd.Start(); err != nil {
				b.Fatal(err)
			}
			defer func() {
				_ = stdin.Close()
				_ = cmd.Wait()
			}()
			line, err := bufio.NewReader(out).ReadString('\n')
			if err != nil || strings.TrimSpace(line) != "ready" {
				b.Fatalf("client process: %q %v", line, err)
			}
			deadline := time.Now().Add(time.Minute)
			for {
				if _, conns, _ := n.st.counts(); int(conns) == b.N {
					break
				}
				if time.Now().After(deadline) {
					b.Fatalf("server holds fewer than %d connections after a minute", b.N)
				}
				time.Sleep(10 * time.Millisecond)
			}
			heap, stack := inUse()
			perHeap := float64(heap-beforeHeap) / float64(b.N)
			perStack := float64(stack-beforeStack) / float64(b.N)
			b.ReportMetric(perHeap+perStack, "bytes/conn")
			b.ReportMetric(perStack, "stack-bytes/conn")
		})
	}
}

// inUse is the heap and goroutine stack memory in use after collections;
// each collection halves at most once the stacks that are mostly unused,
// as a long-running server's do over time.
func inUse() (heap, stack int64) {
	for range 4 {
		runtime.GC()
	}
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapInuse), int64(m.StackInuse)
}
