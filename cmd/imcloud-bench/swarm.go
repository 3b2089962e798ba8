package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"imcloud/proto/client"
	"imcloud/proto/wire"
	"imcloud/stages/logic/token"
)

// The cluster bench's message body: a phase byte, the send time (Unix ns)
// and a sequence number; a client counts each (phase, sequence) once.
const (
	swarmBodyLen = 17
	// swarmRoom is the room every swarm client joins.
	swarmRoom = "live://cluster"
	// phases a swarm keeps statistics for, by their byte.
	phaseRoom = 'R'
	phaseAll  = 'A'
	phaseMids = 'M'
)

var swarmPhases = []byte{phaseRoom, phaseAll, phaseMids}

// swarmConfig: clients held open on one cloud node, answering a driver.
type swarmConfig struct {
	clientConfig
	Clients int
	// MidBase is the first client's user id; client i is MidBase+i.
	MidBase int64
	// Control is where the swarm answers its driver (loopback).
	Control string
	// Hold bounds how long the swarm runs.
	Hold time.Duration
}

// phaseStats is what the clients of one swarm saw of one phase.
type phaseStats struct {
	delivered, dups atomic.Int64
	last            atomic.Int64 // Unix ns of the latest delivery
	lat             latencies
}

// swarmReport is a swarm's answer to its driver.
type swarmReport struct {
	Clients        int                      `json:"clients"`
	Connected      int64                    `json:"connected"`
	ConnectSeconds float64                  `json:"connect_seconds"`
	Closed         int64                    `json:"closed"` // connections the server ended
	Err            string                   `json:"error,omitempty"`
	Phases         map[string]swarmPhaseOut `json:"phases"`
}

type swarmPhaseOut struct {
	Delivered int64       `json:"delivered"`
	Dups      int64       `json:"duplicated"`
	LastNs    int64       `json:"last_unix_ns"`
	LatencyMs percentiles `json:"latency_ms"`
	// Samples are the latencies in ms, for the driver to merge swarms'
	// percentiles exactly.
	Samples []float64 `json:"samples,omitempty"`
}

// swarm connects the clients, reads what they receive and answers GET
// /report on Control until Hold ends or the context does.
func swarm(ctx context.Context, c swarmConfig, progress io.Writer) (swarmReport, error) {
	if err := loopbackOnly(c.Control); err != nil {
		return swarmReport{}, err
	}
	ln, err := net.Listen("tcp", c.Control)
	if err != nil {
		return swarmReport{}, fmt.Errorf("swarm control: %w", err)
	}
	stats := map[byte]*phaseStats{}
	for _, p := range swarmPhases {
		stats[p] = &phaseStats{}
	}
	var (
		connected, closed atomic.Int64
		mu                sync.Mutex
		connectSecs       float64
		connectErr        error
	)
	report := func(samples bool) swarmReport {
		mu.Lock()
		r := swarmReport{Clients: c.Clients, Connected: connected.Load(), ConnectSeconds: connectSecs, Closed: closed.Load(), Phases: map[string]swarmPhaseOut{}}
		if connectErr != nil {
			r.Err = connectErr.Error()
		}
		mu.Unlock()
		for _, p := range swarmPhases {
			s := stats[p]
			out := swarmPhaseOut{Delivered: s.delivered.Load(), Dups: s.dups.Load(), LastNs: s.last.Load(), LatencyMs: s.lat.percentiles()}
			if samples {
				out.Samples = s.lat.millis()
			}
			r.Phases[string(p)] = out
		}
		return r
	}
	srv := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(report(r.URL.Query().Get("samples") != ""))
	})}
	go func() { _ = srv.Serve(ln) }()
	defer srv.Close()

	ctx, cancel := context.WithTimeout(ctx, c.Hold)
	defer cancel()
	stop := make(chan struct{})
	go ticker(progress, stop, func(e time.Duration) string {
		return fmt.Sprintf("swarm %s: %d of %d connected", e, connected.Load(), c.Clients)
	})
	start := time.Now()
	conns, err := connectAll(ctx, c.clientConfig, c.Clients, func(i int) token.Claims {
		return token.Claims{Mid: c.MidBase + int64(i), Rooms: []string{swarmRoom}}
	}, &connected)
	close(stop)
	mu.Lock()
	connectSecs, connectErr = time.Since(start).Seconds(), err
	mu.Unlock()
	if err != nil {
		<-ctx.Done() // the driver reads the error
		return report(false), err
	}
	var readers sync.WaitGroup
	for _, conn := range conns {
		readers.Go(func() {
			swarmRead(conn, stats)
			if ctx.Err() == nil {
				closed.Add(1)
			}
		})
	}
	// Heartbeats, spread over a minute: a node closes a client silent for
	// two heartbeat intervals (8 minutes by default), and a slow run's
	// waits add up to more than that.
	go func() {
		t := time.NewTicker(time.Minute / time.Duration(max(len(conns), 1)))
		defer t.Stop()
		for i := 0; ; i = (i + 1) % len(conns) {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				_ = conns[i].WriteRaw(wire.Encode(wire.OpHeartbeat, 0, nil))
			}
		}
	}()
	<-ctx.Done()
	closeAll(conns)
	readers.Wait()
	return report(false), nil
}

// swarmRead counts a client's deliveries by phase.
func swarmRead(conn *client.Conn, stats map[byte]*phaseStats) {
	seen := map[[9]byte]bool{}
	for {
		p, err := conn.Read()
		if err != nil {
			return
		}
		if p.Op != 1000 || len(p.Body) != swarmBodyLen {
			continue
		}
		s := stats[p.Body[0]]
		if s == nil {
			continue
		}
		now := time.Now().UnixNano()
		var k [9]byte
		k[0] = p.Body[0]
		copy(k[1:], p.Body[9:])
		if seen[k] {
			s.dups.Add(1)
			continue
		}
		seen[k] = true
		s.delivered.Add(1)
		for l := s.last.Load(); now > l && !s.last.CompareAndSwap(l, now); l = s.last.Load() {
		}
		s.lat.AddAll([]time.Duration{time.Duration(now - int64(binary.BigEndian.Uint64(p.Body[1:9])))})
	}
}

// swarmBody is a push's body for phase and seq, stamped at (a paced
// push's scheduled time, so that a driver that falls behind shows it).
func swarmBody(phase byte, seq uint64, at time.Time) []byte {
	b := make([]byte, swarmBodyLen)
	b[0] = phase
	binary.BigEndian.PutUint64(b[1:9], uint64(at.UnixNano()))
	binary.BigEndian.PutUint64(b[9:], seq)
	return b
}

// Print writes the summary table.
func (r swarmReport) Print(w io.Writer) {
	table(w, [][2]string{
		{"mode", "swarm"},
		{"clients (connected)", fmt.Sprintf("%d (%d)", r.Clients, r.Connected)},
		{"connect seconds", fmt.Sprintf("%.1f", r.ConnectSeconds)},
		{"closed by the server", fmt.Sprint(r.Closed)},
	})
}
