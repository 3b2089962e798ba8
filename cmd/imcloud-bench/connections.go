package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"imcloud/stages/logic/token"
)

// connectionsConfig opens idle connections.
type connectionsConfig struct {
	clientConfig
	Clients int
	// ServerPID, when set, is read from /proc for the server's memory.
	ServerPID int
	// Hold keeps the connections open this long after the last connected.
	Hold time.Duration
}

// connectionsResult is what the connections mode measured.
type connectionsResult struct {
	Clients        int     `json:"clients"`
	Seconds        float64 `json:"connect_seconds"`
	PerSecond      float64 `json:"connects_per_second"`
	ServerRSSDelta int64   `json:"server_rss_delta_bytes,omitempty"`
	ServerRSS      int64   `json:"server_rss_bytes,omitempty"` // with the clients connected
	BytesPerConn   float64 `json:"server_bytes_per_connection,omitempty"`
	// CPUPerConnect is the server's CPU time (user + system) while the
	// clients connected, per connect: upgrade, handshake, token check and
	// registration.
	CPUPerConnect time.Duration `json:"server_cpu_per_connect_ns,omitempty"`
}

// connections opens Clients idle, authenticated connections.
func connections(ctx context.Context, c connectionsConfig, progress io.Writer) (connectionsResult, error) {
	before, err := rss(c.ServerPID)
	if err != nil {
		return connectionsResult{}, err
	}
	var connected atomic.Int64
	stop := make(chan struct{})
	go ticker(progress, stop, func(e time.Duration) string {
		return fmt.Sprintf("connections %s: %d of %d", e, connected.Load(), c.Clients)
	})
	cpu0, err := cpuTime(c.ServerPID)
	if err != nil {
		return connectionsResult{}, err
	}
	start := time.Now()
	conns, err := connectAll(ctx, c.clientConfig, c.Clients, func(i int) token.Claims { return token.Claims{Mid: int64(i + 1)} }, &connected)
	close(stop)
	if err != nil {
		return connectionsResult{}, err
	}
	defer closeAll(conns)
	secs := time.Since(start).Seconds()
	cpu1, err := cpuTime(c.ServerPID)
	if err != nil {
		return connectionsResult{}, err
	}
	res := connectionsResult{Clients: c.Clients, Seconds: secs, PerSecond: float64(c.Clients) / secs}
	if c.ServerPID != 0 {
		res.CPUPerConnect = (cpu1 - cpu0) / time.Duration(c.Clients)
	}
	select {
	case <-time.After(c.Hold):
	case <-ctx.Done():
	}
	after, err := rss(c.ServerPID)
	if err != nil {
		return res, err
	}
	if c.ServerPID != 0 {
		res.ServerRSS = after
		res.ServerRSSDelta = after - before
		// A server that kept memory from earlier load may not grow at all:
		// no per-connection figure then, rather than a meaningless one.
		if after > before {
			res.BytesPerConn = float64(after-before) / float64(c.Clients)
		}
	}
	return res, nil
}

// cpuTime reads a process's CPU time (user + system) from /proc; 0 when
// pid is 0. The kernel counts it in clock ticks of 10 ms here (USER_HZ).
func cpuTime(pid int) (time.Duration, error) {
	if pid == 0 {
		return 0, nil
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("server CPU: %w", err)
	}
	// Fields after the command name, which is in parentheses and may
	// hold spaces: utime and stime are the 12th and 13th of them.
	_, rest, ok := strings.Cut(string(b), ") ")
	f := strings.Fields(rest)
	if !ok || len(f) < 13 {
		return 0, fmt.Errorf("server CPU: /proc/%d/stat does not parse", pid)
	}
	var ticks int64
	for _, s := range f[11:13] {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("server CPU: %w", err)
		}
		ticks += n
	}
	return time.Duration(ticks) * 10 * time.Millisecond, nil
}

// rss reads a process's resident memory from /proc; 0 when pid is 0.
func rss(pid int) (int64, error) {
	if pid == 0 {
		return 0, nil
	}
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("server memory: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb * 1024, err
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}

// Print writes the summary table.
func (r connectionsResult) Print(w io.Writer) {
	rows := [][2]string{
		{"mode", "connections"},
		{"clients", fmt.Sprint(r.Clients)},
		{"connects/s", fmt.Sprintf("%.0f", r.PerSecond)},
	}
	switch {
	case r.BytesPerConn > 0:
		rows = append(rows, [2]string{"server RSS per connection", fmt.Sprintf("%.0f bytes", r.BytesPerConn)})
	case r.ServerRSS > 0:
		rows = append(rows, [2]string{"server RSS per connection", "n/a: RSS did not grow (memory kept from earlier load); use a fresh server"})
	}
	if r.CPUPerConnect > 0 {
		rows = append(rows, [2]string{"server CPU per connect", fmt.Sprintf("%.0f µs", float64(r.CPUPerConnect)/float64(time.Microsecond))})
	}
	table(w, rows)
}
