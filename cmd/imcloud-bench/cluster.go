package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// clusterConfig drives swarms (each holding clients on one cloud node)
// through the cluster bench's phases.
type clusterConfig struct {
	API    string
	APIKey string
	// Swarms are the swarms' control addresses.
	Swarms []string
	// Nodes are the cloud processes, for memory per connection: pid,
	// RSS before any client connected (bytes) and the clients it holds.
	Nodes []clusterNode
	// Speed paces the broadcast (connections per second per node).
	Speed int
	// Users and Rate: the mid phase pushes to Users distinct users at
	// Rate pushes per second, one push each.
	Users, Rate int
	// MidBase and Clients name the users: the swarms' mids run from
	// MidBase to MidBase+Clients-1; the mid phase picks Users of them
	// spread evenly.
	MidBase int64
	// Wait bounds each wait: for the clients to connect, and for a
	// phase's deliveries.
	Wait time.Duration
	// Clients is how many clients the swarms hold together.
	Clients int
}

type clusterNode struct {
	PID     int
	BaseRSS int64
	Clients int
}

// clusterResult is what the cluster bench measured.
type clusterResult struct {
	Clients          int64          `json:"clients"`
	ConnectSeconds   float64        `json:"connect_all_seconds"`
	NodeBytesPerConn []float64      `json:"node_rss_bytes_per_connection"`
	Phases           []clusterPhase `json:"phases"`
	ClosedByServer   int64          `json:"closed_by_server"`
}

type clusterPhase struct {
	Name      string      `json:"name"`
	Pushes    int         `json:"pushes_accepted"`
	Failed    int         `json:"pushes_failed"`
	Expected  int64       `json:"deliveries_expected"`
	Delivered int64       `json:"delivered"`
	Lost      int64       `json:"lost"`
	Dups      int64       `json:"duplicated"`
	LatencyMs percentiles `json:"latency_ms"`
	// LastSeconds is from the first push to the last delivery.
	LastSeconds float64 `json:"first_push_to_last_delivery_seconds"`
}

// cluster waits for every swarm to connect, then runs a room push to all
// clients, a paced broadcast, and pushes to distinct users at a rate, and
// gathers what the swarms saw.
func cluster(ctx context.Context, c clusterConfig, progress io.Writer) (clusterResult, error) {
	if err := loopbackOnly(c.API); err != nil {
		return clusterResult{}, err
	}
	hc := &http.Client{Timeout: 10 * time.Second}
	reports := func(samples bool) ([]swarmReport, error) {
		out := make([]swarmReport, len(c.Swarms))
		for i, addr := range c.Swarms {
			if err := loopbackOnly(addr); err != nil {
				return nil, err
			}
			u := "http://" + addr + "/report"
			if samples {
				u += "?samples=1"
			}
			resp, err := hc.Get(u)
			if err != nil {
				return nil, fmt.Errorf("swarm %s: %w", addr, err)
			}
			err = json.NewDecoder(resp.Body).Decode(&out[i])
			_ = resp.Body.Close()
			if err != nil {
				return nil, fmt.Errorf("swarm %s: %w", addr, err)
			}
			if out[i].Err != "" {
				return nil, fmt.Errorf("swarm %s: %s", addr, out[i].Err)
			}
		}
		return out, nil
	}
	var res clusterResult
	// Every client connected.
	deadline := time.Now().Add(c.Wait)
	for {
		rs, err := reports(false)
		if err == nil {
			var clients, connected int64
			secs := 0.0
			done := true
			for _, r := range rs {
				clients += int64(r.Clients)
				connected += r.Connected
				secs = max(secs, r.ConnectSeconds)
				done = done && r.Connected == int64(r.Clients) && r.ConnectSeconds > 0
			}
			if clients != int64(c.Clients) {
				return res, fmt.Errorf("the swarms hold %d clients, want %d: is a swarm of another run on one of %v?", clients, c.Clients, c.Swarms)
			}
			fmt.Fprintf(progress, "cluster: %d of %d clients connected\n", connected, clients)
			if done {
				res.Clients, res.ConnectSeconds = clients, secs
				break
			}
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return res, fmt.Errorf("clients not connected within %s: %v", c.Wait, err)
		}
		time.Sleep(time.Second)
	}
	for _, n := range c.Nodes {
		if r, err := rss(n.PID); err == nil && n.Clients > 0 {
			res.NodeBytesPerConn = append(res.NodeBytesPerConn, float64(r-n.BaseRSS)/float64(n.Clients))
		}
	}
	push := func(path string, q string, body []byte) bool {
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+c.API+path+"?"+q, bytes.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+c.APIKey)
		resp, err := hc.Do(req)
		if err != nil {
			return false
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		_ = resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}
	// phase runs send and waits until expected deliveries of phase p
	// arrived (or c.Wait passed), then gathers the swarms' samples.
	phase := func(name string, p byte, send func() (ok, failed int, expected int64)) error {
		before, err := reports(false)
		if err != nil {
			return err
		}
		start := time.Now()
		ok, failed, expected := send()
		ph := clusterPhase{Name: name, Pushes: ok, Failed: failed, Expected: expected}
		deadline := time.Now().Add(c.Wait)
		for {
			rs, err := reports(false)
			if err != nil {
				return err
			}
			var got int64
			for i, r := range rs {
				got += r.Phases[string(p)].Delivered - before[i].Phases[string(p)].Delivered
			}
			fmt.Fprintf(progress, "cluster %s: %d of %d delivered\n", name, got, expected)
			if got >= expected || time.Now().After(deadline) || ctx.Err() != nil {
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		rs, err := reports(true)
		if err != nil {
			return err
		}
		var samples []float64
		var last int64
		for _, r := range rs {
			o := r.Phases[string(p)]
			ph.Delivered += o.Delivered
			ph.Dups += o.Dups
			last = max(last, o.LastNs)
			samples = append(samples, o.Samples...)
		}
		ph.Lost = max(ph.Expected-ph.Delivered, 0)
		ph.LatencyMs = percentilesOf(samples)
		if last > 0 {
			ph.LastSeconds = time.Duration(last - start.UnixNano()).Seconds()
		}
		res.Phases = append(res.Phases, ph)
		return nil
	}
	if err := phase("room push to every client", phaseRoom, func() (int, int, int64) {
		if push("/im/push/room", "operation=1000&type=live&room=cluster", swarmBody(phaseRoom, 0, time.Now())) {
			return 1, 0, res.Clients
		}
		return 0, 1, 0
	}); err != nil {
		return res, err
	}
	if err := phase(fmt.Sprintf("push/all, speed %d per node", c.Speed), phaseAll, func() (int, int, int64) {
		if push("/im/push/all", "operation=1000&speed="+strconv.Itoa(c.Speed), swarmBody(phaseAll, 0, time.Now())) {
			return 1, 0, res.Clients
		}
		return 0, 1, 0
	}); err != nil {
		return res, err
	}
	if err := phase(fmt.Sprintf("push/mids to %d users at %d/s", c.Users, c.Rate), phaseMids, func() (int, int, int64) {
		step := max(res.Clients/int64(max(c.Users, 1)), 1)
		var ok, failed atomic.Int64
		work := make(chan int, 256)
		var wg sync.WaitGroup
		start := time.Now()
		interval := time.Second / time.Duration(max(c.Rate, 1))
		for range 32 {
			wg.Go(func() {
				for i := range work {
					mid := c.MidBase + int64(i)*step
					at := start.Add(time.Duration(i) * interval)
					if push("/im/push/mids", "operation=1000&mids="+strconv.FormatInt(mid, 10), swarmBody(phaseMids, uint64(i), at)) {
						ok.Add(1)
					} else {
						failed.Add(1)
					}
				}
			})
		}
		for i := 0; i < c.Users && ctx.Err() == nil; i++ {
			if d := time.Until(start.Add(time.Duration(i) * interval)); d > 0 {
				time.Sleep(d)
			}
			work <- i
		}
		close(work)
		wg.Wait()
		if secs := time.Since(start).Seconds(); secs > 0 {
			fmt.Fprintf(progress, "cluster: %d mid pushes in %.1f s (%.0f/s; asked %d/s)\n", c.Users, secs, float64(c.Users)/secs, c.Rate)
		}
		return int(ok.Load()), int(failed.Load()), ok.Load()
	}); err != nil {
		return res, err
	}
	rs, err := reports(false)
	if err != nil {
		return res, err
	}
	for _, r := range rs {
		res.ClosedByServer += r.Closed
	}
	return res, nil
}

// Print writes the summary table.
func (r clusterResult) Print(w io.Writer) {
	var perConn []string
	for _, b := range r.NodeBytesPerConn {
		perConn = append(perConn, fmt.Sprintf("%.0f", b))
	}
	rows := [][2]string{
		{"mode", "cluster"},
		{"clients", fmt.Sprint(r.Clients)},
		{"time to connect all", fmt.Sprintf("%.1f s", r.ConnectSeconds)},
		{"RSS per connection by node (bytes)", strings.Join(perConn, " ")},
		{"connections closed by a server", fmt.Sprint(r.ClosedByServer)},
	}
	for _, p := range r.Phases {
		rows = append(rows,
			[2]string{p.Name, fmt.Sprintf("%d pushes (%d failed): %d of %d delivered, %d lost, %d duplicated", p.Pushes, p.Failed, p.Delivered, p.Expected, p.Lost, p.Dups)},
			[2]string{"  latency p50/p99/max ms", fmt.Sprintf("%.1f / %.1f / %.1f", p.LatencyMs.P50, p.LatencyMs.P99, p.LatencyMs.Max)},
			[2]string{"  first push to last delivery", fmt.Sprintf("%.2f s", p.LastSeconds)})
	}
	table(w, rows)
}
