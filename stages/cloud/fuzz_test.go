package cloud

import (
	"encoding/binary"
	"fmt"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"imcloud/pipeline/config"
	"imcloud/proto/wire"
)

// fuzzOps are the client operations FuzzClientOps sends.
var fuzzOps = [...]int32{wire.OpHeartbeat, wire.OpSendMsg, wire.OpChangeRoom, wire.OpSub, wire.OpUnsub}

// opScript encodes records of (operation index, body) as FuzzClientOps
// reads them: one byte picking the operation, a 2-byte big-endian body
// length, the body.
func opScript(recs ...any) []byte {
	var b []byte
	for i := 0; i < len(recs); i += 2 {
		body := recs[i+1].(string)
		b = append(b, recs[i].(byte))
		b = binary.BigEndian.AppendUint16(b, uint16(len(body)))
		b = append(b, body...)
	}
	return b
}

// repeatScript is n copies of the record (op, body).
func repeatScript(n int, op byte, body string) []byte {
	var b []byte
	for range n {
		b = append(b, opScript(op, body)...)
	}
	return b
}

func opList(from, n int) string {
	var b strings.Builder
	for i := range n {
		fmt.Fprintf(&b, "%d,", from+i)
	}
	return b.String()
}

// FuzzClientOps sends an authenticated client's operations 2, 4, 12, 14
// and 16 with arbitrary bodies to a node on real sockets. Whatever they
// hold, the node does not panic, still serves another client, and its
// goroutines and heap stay bounded. The seeds are the attacks of issue 10.
func FuzzClientOps(f *testing.F) {
	const (
		hb, up, room, sub, unsub = byte(0), byte(1), byte(2), byte(3), byte(4)
		maxRecords               = 2000
	)
	f.Add(opScript(room, "\xff"))
	f.Add(opScript(room, "live://\xff", hb, ""))
	f.Add(opScript(room, "private://board-meeting"))
	f.Add(opScript(room, "live2://x", room, "live://1"))
	f.Add(opScript(room, "live://"+strings.Repeat("x", 200)))
	f.Add(opScript(room, "", room, " live://2 "))
	var accepts []byte
	for i := range 20 { // 16,000 operations, as the attack that took 1.5 GB
		accepts = append(accepts, opScript(sub, opList(i*800, 800))...)
	}
	f.Add(accepts)
	f.Add(opScript(sub, "abc", sub, "99999999999", sub, ",,,", sub, "-1"))
	f.Add(repeatScript(300, hb, ""))
	var rooms []byte
	for i := range 50 { // each new room waits for a paced report (minAnnounceGap)
		rooms = append(rooms, opScript(room, fmt.Sprintf("live://%d", i))...)
	}
	f.Add(rooms)
	f.Add(repeatScript(300, unsub, strings.Repeat("1,", 2000)))
	f.Add(repeatScript(100, up, "hello"))
	f.Add(opScript(up, strings.Repeat("x", 5000)))
	f.Add([]byte{0xff, 0xff})

	n := startNode(f, func(c *config.Cloud) { c.ClientBurst = 1000 })
	baseGoroutines := runtime.NumGoroutine()
	// maxHeap bounds the live heap of the whole test process: the node,
	// the clients and the fuzzing engine, whose mutator alone holds a
	// 100 MB buffer. One client once grew a node by 1.5 GB in 40 s.
	const maxHeap = 256 << 20
	var (
		ms   runtime.MemStats
		runs int
	)

	f.Fuzz(func(t *testing.T, script []byte) {
		c := n.connect(t, "tcp", claims{Mid: 1, Key: "fuzz", Rooms: []string{"public://lobby", "live://*"}, Accepts: []int32{}})
		// Read what the node answers, so that only the node's limits end
		// the connection; a heartbeat after the script is the fence that
		// says the node handled all of it.
		var lastHeartbeat atomic.Int32 // sequence of the last heartbeat reply
		done := make(chan struct{})
		go func() {
			defer close(done)
			for {
				p, err := c.Read()
				if err != nil {
					return
				}
				if p.Op == wire.OpHeartbeatReply {
					lastHeartbeat.Store(p.Seq)
				}
			}
		}()
		for i := 0; len(script) >= 3 && i < maxRecords; i++ {
			op := fuzzOps[int(script[0])%len(fuzzOps)]
			size := min(int(binary.BigEndian.Uint16(script[1:3])), len(script)-3)
			body := script[3 : 3+size]
			script = script[3+size:]
			if _, err := c.Send(op, body); err != nil {
				break // the node closed the connection
			}
		}
		if fence, err := c.Send(wire.OpHeartbeat, nil); err == nil {
			deadline := time.Now().Add(wait)
		wait:
			for lastHeartbeat.Load() != fence {
				select {
				case <-done:
					break wait // closed by the node
				case <-time.After(time.Millisecond):
				}
				if time.Now().After(deadline) {
					t.Fatal("the node neither answered the fence nor closed the connection")
				}
			}
		}
		_ = c.Close()
		<-done

		waitFor(t, "the session to end", func() bool { return sessions(n.st) == 0 })
		// Another client is served.
		other := n.connect(t, "tcp", claims{Mid: 2, Key: "other"})
		call(t, other, wire.OpHeartbeat, "")
		_ = other.Close()
		waitFor(t, "the other session to end", func() bool { return sessions(n.st) == 0 })

		waitFor(t, "goroutines to settle", func() bool { return runtime.NumGoroutine() < baseGoroutines+64 })
		if runs++; runs%256 == 0 {
			runtime.GC()
			runtime.ReadMemStats(&ms)
			if ms.HeapAlloc > maxHeap {
				t.Fatalf("live heap is %d bytes after %d runs, want at most %d", ms.HeapAlloc, runs, maxHeap)
			}
		}
	})
}

// sessions counts the node's registered connections.
func sessions(st *Stage) int {
	total := 0
	for _, b := range st.buckets {
		b.mu.RLock()
		total += len(b.chs)
		b.mu.RUnlock()
	}
	return total
}
