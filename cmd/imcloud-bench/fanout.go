package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"imcloud/proto/client"
	"imcloud/stages/logic/token"
)

// fanoutConfig: clients spread over rooms, room pushes at a steady rate.
type fanoutConfig struct {
	clientConfig
	API      string // logic's HTTP address
	APIKey   string
	Clients  int
	Rooms    int
	Rate     int // pushes per second, over all rooms
	Duration time.Duration
	// Drain is how long to wait, after the last push, for deliveries.
	Drain time.Duration
}

// fanoutResult is what the fanout mode measured.
type fanoutResult struct {
	Clients      int         `json:"clients"`
	Rooms        int         `json:"rooms"`
	Pushes       int64       `json:"pushes_accepted"`
	PushFailures int64       `json:"pushes_failed"`
	Expected     int64       `json:"deliveries_expected"`
	Delivered    int64       `json:"deliveries"`
	Lost         int64       `json:"lost"`
	Duplicated   int64       `json:"duplicated"`
	PerSecond    float64     `json:"delivered_per_second"`
	LatencyMs    percentiles `json:"latency_ms"`
	Seconds      float64     `json:"seconds"` // first push to last delivery
}

// The message body: send time (Unix ns) and push sequence number.
const bodyLen = 16

// fanout connects the clients, pushes to their rooms at Rate for
// Duration, and counts what arrives, when.
func fanout(ctx context.Context, c fanoutConfig, progress io.Writer) (fanoutResult, error) {
	if err := loopbackOnly(c.API); err != nil {
		return fanoutResult{}, err
	}
	rooms := max(c.Rooms, 1)
	room := func(i int) string { return fmt.Sprintf("bench-%d", i%rooms) }
	var connected atomic.Int64
	fmt.Fprintf(progress, "connecting %d clients to %s\n", c.Clients, c.Target)
	conns, err := connectAll(ctx, c.clientConfig, c.Clients, func(i int) token.Claims {
		return token.Claims{Mid: int64(i + 1), Rooms: []string{"live://" + room(i)}}
	}, &connected)
	if err != nil {
		return fanoutResult{}, err
	}
	defer closeAll(conns)
	members := make([]int64, rooms)
	for i := range conns {
		members[i%rooms]++
	}

	maxPushes := c.Rate*int(c.Duration/time.Second+1) + c.Rate
	var (
		lat       latencies
		delivered atomic.Int64
		dups      atomic.Int64
		last      atomic.Int64 // Unix ns of the latest delivery
		readers   sync.WaitGroup
	)
	for _, conn := range conns {
		readers.Go(func() { read(conn, maxPushes, &lat, &delivered, &dups, &last) })
	}

	start := time.Now()
	pushes, failures, pushSecs := pushAtRate(ctx, c, rooms, room, &delivered, progress)

	var expected, accepted int64
	for _, r := range pushes {
		if r >= 0 {
			expected += members[r]
			accepted++
		}
	}
	deadline := time.Now().Add(c.Drain)
	for delivered.Load() < expected && time.Now().Before(deadline) && ctx.Err() == nil {
		time.Sleep(10 * time.Millisecond)
	}
	closeAll(conns)
	readers.Wait()
	// The rate counts from the first push to the last delivery: when the
	// server falls behind, deliveries run on after the pushes stop.
	secs := max(pushSecs, time.Duration(last.Load()-start.UnixNano()).Seconds())
	res := fanoutResult{
		Clients: c.Clients, Rooms: rooms, Pushes: accepted, PushFailures: failures,
		Expected: expected, Delivered: delivered.Load(), Duplicated: dups.Load(),
		Lost: max(expected-delivered.Load(), 0), PerSecond: float64(delivered.Load()) / secs,
		LatencyMs: lat.percentiles(), Seconds: secs,
	}
	return res, nil
}

// read counts the distinct pushes a client receives and their latency.
func read(conn *client.Conn, maxPushes int, lat *latencies, delivered, dups, last *atomic.Int64) {
	seen := make([]bool, maxPushes)
	var mine []time.Duration
	var latest int64
	defer func() {
		lat.AddAll(mine)
		for l := last.Load(); latest > l && !last.CompareAndSwap(l, latest); l = last.Load() {
		}
	}()
	for {
		p, err := conn.Read()
		if err != nil {
			return
		}
		if p.Op != 1000 || len(p.Body) != bodyLen {
			continue
		}
		now := time.Now().UnixNano()
		sent := int64(binary.BigEndian.Uint64(p.Body))
		seq := binary.BigEndian.Uint64(p.Body[8:])
		if seq >= uint64(len(seen)) {
			continue
		}
		if seen[seq] {
			dups.Add(1)
			continue
		}
		seen[seq] = true
		delivered.Add(1)
		latest = max(latest, now)
		mine = append(mine, time.Duration(now-sent))
	}
}

// pushAtRate sends room pushes at c.Rate for c.Duration from a pool of
// workers; pushes[seq] is the room index of each accepted push, -1 if it
// failed.
func pushAtRate(ctx context.Context, c fanoutConfig, rooms int, room func(int) string, delivered *atomic.Int64, progress io.Writer) ([]int, int64, float64) {
	total := c.Rate * int(c.Duration/time.Second)
	pushes := make([]int, total)
	var failures atomic.Int64
	tr := &http.Transport{MaxIdleConnsPerHost: 64}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	work := make(chan int, 1024)
	var wg sync.WaitGroup
	for range 32 {
		wg.Go(func() {
			body := make([]byte, bodyLen)
			for seq := range work {
				r := seq % rooms
				binary.BigEndian.PutUint64(body, uint64(time.Now().UnixNano()))
				binary.BigEndian.PutUint64(body[8:], uint64(seq))
				url := fmt.Sprintf("http://%s/im/push/room?operation=1000&type=live&room=%s", c.API, room(r))
				req, _ := http.NewRequest(http.MethodPost, url, strings.NewReader(string(body)))
				req.Header.Set("Authorization", "Bearer "+c.APIKey)
				resp, err := hc.Do(req)
				if err == nil {
					_, _ = io.Copy(io.Discard, resp.Body)
					_ = resp.Body.Close()
				}
				if err != nil || resp.StatusCode != http.StatusOK {
					failures.Add(1)
					pushes[seq] = -1
					continue
				}
				pushes[seq] = r
			}
		})
	}
	stop := make(chan struct{})
	var sent atomic.Int64
	go ticker(progress, stop, func(e time.Duration) string {
		return fmt.Sprintf("fanout %s: %d pushes, %d delivered", e, sent.Load(), delivered.Load())
	})
	start := time.Now()
	interval := time.Second / time.Duration(max(c.Rate, 1))
	for seq := 0; seq < total && ctx.Err() == nil; seq++ {
		// Pace against the clock, not the previous send: no drift.
		if d := time.Until(start.Add(time.Duration(seq) * interval)); d > 0 {
			time.Sleep(d)
		}
		work <- seq
		sent.Add(1)
	}
	close(work)
	wg.Wait()
	close(stop)
	return pushes, failures.Load(), time.Since(start).Seconds()
}

// Print writes the summary table.
func (r fanoutResult) Print(w io.Writer) {
	table(w, [][2]string{
		{"mode", "fanout"},
		{"clients / rooms", fmt.Sprintf("%d / %d", r.Clients, r.Rooms)},
		{"pushes accepted (failed)", fmt.Sprintf("%d (%d)", r.Pushes, r.PushFailures)},
		{"deliveries expected", fmt.Sprint(r.Expected)},
		{"delivered", fmt.Sprint(r.Delivered)},
		{"lost / duplicated", fmt.Sprintf("%d / %d", r.Lost, r.Duplicated)},
		{"delivered/s", fmt.Sprintf("%.0f", r.PerSecond)},
		{"latency p50/p90/p99/p99.9 ms", fmt.Sprintf("%.2f / %.2f / %.2f / %.2f", r.LatencyMs.P50, r.LatencyMs.P90, r.LatencyMs.P99, r.LatencyMs.P999)},
	})
}
