package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"imcloud/proto/client"
	"imcloud/stages/logic/token"
)

// reconnectConfig is the reconnect storm (issue 12): Clients
// connections that opted in to recovery, spread over Rooms rooms, all
// disconnect; Behind messages are pushed to each room; then every client
// reconnects at once with its positions and recovers what it missed.
type reconnectConfig struct {
	clientConfig
	API, APIKey string
	Clients     int
	Rooms       int
	Behind      int
	// ServerPID, when set, is sampled from /proc for the server's peak
	// memory during the storm.
	ServerPID int
	// Timeout bounds the storm: a client that has not recovered by then
	// counts as not recovered.
	Timeout time.Duration
}

// reconnectResult is what the reconnect mode measured.
type reconnectResult struct {
	Clients int `json:"clients"`
	Rooms   int `json:"rooms"`
	Behind  int `json:"behind"`
	// Recovered clients got every missed message, in order, once.
	Recovered    int64 `json:"recovered"`
	NotRecovered int64 `json:"not_recovered"` // op 22 said no, or the storm timed out
	// Reasons counts why clients were not recovered: op 22's reason, or
	// "read" for a client whose messages did not all arrive.
	Reasons    map[string]int64 `json:"not_recovered_reasons,omitempty"`
	Failed     int64            `json:"failed"` // could not reconnect
	Gaps       int64            `json:"gaps"`
	Duplicated int64            `json:"duplicated"`
	// Seconds from the first reconnect to the last client recovered.
	Seconds float64 `json:"seconds"`
	// PerClientMs: from a client's reconnect to its last missed message.
	PerClientMs percentiles `json:"per_client_ms"`
	// ServerRSS before the storm, and the highest sampled during it.
	ServerRSS     int64 `json:"server_rss_bytes,omitempty"`
	ServerPeakRSS int64 `json:"server_peak_rss_bytes,omitempty"`
}

// recoverClaims are a client's token claims with the recover opt-in,
// which token.Claims does not carry.
type recoverClaims struct {
	token.Claims
	Recover bool `json:"recover"`
}

// stormConcurrency bounds the dials in flight at once: "all at once" is
// as fast as the server accepts, not 10,000 SYNs against a listen backlog
// of 4,096.
const stormConcurrency = 1024

// reconnect runs the storm.
func reconnect(ctx context.Context, c reconnectConfig, progress io.Writer) (reconnectResult, error) {
	res := reconnectResult{Clients: c.Clients, Rooms: c.Rooms, Behind: c.Behind}
	if c.Clients < 1 || c.Rooms < 1 || c.Behind < 1 {
		return res, errors.New("reconnect: --clients, --rooms and --behind must be at least 1")
	}
	if err := loopbackOnly(targetHost(c.Target)); err != nil {
		return res, err
	}
	room := func(i int) string { return "live://reconnect-" + strconv.Itoa(i%c.Rooms) }
	positions := make([]*client.Positions, c.Clients)
	tokens := make([]string, c.Clients)
	for i := range positions {
		positions[i] = client.NewPositions()
		now := time.Now()
		cl := recoverClaims{Claims: token.Claims{Mid: int64(i + 1), Key: "reconnect-" + strconv.Itoa(i), Rooms: []string{room(i)}}, Recover: true}
		cl.IssuedAt, cl.ExpiresAt = jwt.NewNumericDate(now), jwt.NewNumericDate(now.Add(time.Hour))
		tok, err := jwt.NewWithClaims(jwt.SigningMethodHS256, cl).SignedString([]byte(c.Secret))
		if err != nil {
			return res, fmt.Errorf("reconnect: sign token: %w", err)
		}
		tokens[i] = tok
	}

	// 1. Connect every client and learn where its room stream starts.
	fmt.Fprintf(progress, "reconnect: connecting %d clients\n", c.Clients)
	err := forEach(ctx, c.Clients, func(i int) error {
		conn, err := client.Dial(ctx, c.Target, client.Options{Dialer: dialer(i), Positions: positions[i]})
		if err != nil {
			return err
		}
		defer conn.Close()
		_ = conn.SetReadDeadline(time.Now().Add(30 * time.Second))
		reply, err := conn.Auth([]byte(tokens[i]))
		if err != nil {
			return err
		}
		if !reply.Recover {
			return errors.New("op 8 does not say recover: the server does not support recovery (issue 12), or the claim was refused")
		}
		if _, ok := positions[i].Get("room:" + room(i)); !ok {
			return fmt.Errorf("op 8 gave no position for %s", room(i))
		}
		return nil // closed: the client is away
	})
	if err != nil {
		return res, fmt.Errorf("reconnect: first connect: %w", err)
	}

	// 2. While they are away, Behind messages to every room.
	fmt.Fprintf(progress, "reconnect: pushing %d messages to each of %d rooms\n", c.Behind, c.Rooms)
	if err := pushBehind(ctx, c, room); err != nil {
		return res, err
	}

	// 3. Everyone back at once, with positions.
	before, err := rss(c.ServerPID)
	if err != nil {
		return res, err
	}
	res.ServerRSS = before
	peak := atomic.Int64{}
	peak.Store(before)
	stopSampling := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stopSampling:
				return
			case <-t.C:
				if v, err := rss(c.ServerPID); err == nil && v > peak.Load() {
					peak.Store(v)
				}
			}
		}
	}()
	var recovered, notRecovered, failed, gaps, dups atomic.Int64
	var reasonsMu sync.Mutex
	res.Reasons = map[string]int64{}
	notRecoveredBecause := func(why string) {
		notRecovered.Add(1)
		reasonsMu.Lock()
		res.Reasons[why]++
		reasonsMu.Unlock()
	}
	var lat latencies
	conns := make([]*client.Conn, c.Clients)
	deadline := time.Now().Add(c.Timeout)
	stop := make(chan struct{})
	go ticker(progress, stop, func(e time.Duration) string {
		return fmt.Sprintf("reconnect %s: %d of %d recovered", e, recovered.Load(), c.Clients)
	})
	start := time.Now()
	var last atomic.Int64
	var wg sync.WaitGroup
	sem := make(chan struct{}, stormConcurrency)
	for i := range c.Clients {
		sem <- struct{}{}
		wg.Go(func() {
			t0 := time.Now()
			conn, err := client.Dial(ctx, c.Target, client.Options{Dialer: dialer(i), Positions: positions[i]})
			<-sem
			if err != nil {
				failed.Add(1)
				return
			}
			conns[i] = conn
			_ = conn.SetReadDeadline(deadline)
			if _, err := conn.Auth([]byte(tokens[i])); err != nil {
				failed.Add(1)
				return
			}
			stream := "room:" + room(i)
			from, _ := positions[i].Get(stream)
			reply, err := conn.Resume()
			if err != nil {
				failed.Add(1)
				return
			}
			// Op 8 gave the client its user stream and its room's; both
			// must be recovered (the user stream missed nothing).
			roomAnswered := false
			for _, r := range reply.Streams {
				if !r.Recovered {
					notRecoveredBecause(r.Stream[:strings.IndexByte(r.Stream, ':')] + " " + r.Reason)
					return
				}
				roomAnswered = roomAnswered || r.Stream == stream
			}
			if !roomAnswered {
				notRecoveredBecause("room not in op 22")
				return
			}
			for got := 0; got < c.Behind; {
				m, err := conn.ReadMessage()
				if err != nil {
					notRecoveredBecause("read")
					return
				}
				if m.Stream != stream {
					continue
				}
				if m.Dup {
					dups.Add(1)
					continue
				}
				if m.Gap {
					gaps.Add(1)
				}
				if m.Pos > from.Pos {
					got = int(m.Pos - from.Pos)
				}
			}
			now := time.Now()
			lat.Add(now.Sub(t0))
			for {
				l := last.Load()
				if now.UnixNano() <= l || last.CompareAndSwap(l, now.UnixNano()) {
					break
				}
			}
			recovered.Add(1)
		})
	}
	wg.Wait()
	close(stop)
	close(stopSampling)
	<-sampled
	closeAll(conns)
	res.Recovered, res.NotRecovered, res.Failed = recovered.Load(), notRecovered.Load(), failed.Load()
	res.Gaps, res.Duplicated = gaps.Load(), dups.Load()
	if l := last.Load(); l > 0 {
		res.Seconds = time.Unix(0, l).Sub(start).Seconds()
	}
	res.PerClientMs = lat.percentiles()
	if c.ServerPID != 0 {
		res.ServerPeakRSS = peak.Load()
	}
	return res, ctx.Err()
}

// forEach runs fn for 0..n-1, 128 at a time, and returns the first error.
func forEach(ctx context.Context, n int, fn func(i int) error) error {
	var (
		wg    sync.WaitGroup
		once  sync.Once
		first error
	)
	sem := make(chan struct{}, 128)
	for i := 0; i < n && ctx.Err() == nil; i++ {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			if err := fn(i); err != nil {
				once.Do(func() { first = fmt.Errorf("client %d: %w", i, err) })
			}
		})
	}
	wg.Wait()
	if first != nil {
		return first
	}
	return ctx.Err()
}

// pushBehind sends c.Behind room pushes to every room, each room's in
// order, 32 rooms at a time.
func pushBehind(ctx context.Context, c reconnectConfig, room func(int) string) error {
	tr := &http.Transport{MaxIdleConnsPerHost: 32}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	var (
		wg    sync.WaitGroup
		once  sync.Once
		first error
	)
	sem := make(chan struct{}, 32)
	for r := 0; r < c.Rooms && ctx.Err() == nil; r++ {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			typ, id, _ := strings.Cut(room(r), "://")
			url := fmt.Sprintf("http://%s/im/push/room?operation=1000&type=%s&room=%s", c.API, typ, id)
			for seq := range c.Behind {
				req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader("missed-"+strconv.Itoa(seq)))
				if err == nil {
					req.Header.Set("Authorization", "Bearer "+c.APIKey)
					var resp *http.Response
					if resp, err = hc.Do(req); err == nil {
						_, _ = io.Copy(io.Discard, resp.Body)
						_ = resp.Body.Close()
						if resp.StatusCode != http.StatusOK {
							err = fmt.Errorf("status %d", resp.StatusCode)
						}
					}
				}
				if err != nil {
					once.Do(func() { first = fmt.Errorf("reconnect: push to %s: %w", room(r), err) })
					return
				}
			}
		})
	}
	wg.Wait()
	return first
}

// Print writes the summary table.
func (r reconnectResult) Print(w io.Writer) {
	rows := [][2]string{
		{"mode", "reconnect"},
		{"clients / rooms / behind", fmt.Sprintf("%d / %d / %d", r.Clients, r.Rooms, r.Behind)},
		{"recovered", fmt.Sprint(r.Recovered)},
		{"not recovered / failed", fmt.Sprintf("%d / %d %v", r.NotRecovered, r.Failed, r.Reasons)},
		{"gaps / duplicated", fmt.Sprintf("%d / %d", r.Gaps, r.Duplicated)},
		{"all recovered after", fmt.Sprintf("%.2f s", r.Seconds)},
		{"per client p50/p90/p99/max ms", fmt.Sprintf("%.1f / %.1f / %.1f / %.1f", r.PerClientMs.P50, r.PerClientMs.P90, r.PerClientMs.P99, r.PerClientMs.Max)},
	}
	if r.ServerPeakRSS > 0 {
		rows = append(rows, [2]string{"server RSS before / peak", fmt.Sprintf("%.0f / %.0f MB", float64(r.ServerRSS)/(1<<20), float64(r.ServerPeakRSS)/(1<<20))})
	}
	table(w, rows)
}
